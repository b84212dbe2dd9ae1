"""`python -m aligner.checkpoints ADAPTER_DIR`: the held-out metrics of a run's checkpoints, computed only when the
promotion gate reaches them (see train.evaluate_checkpoints). The app runs it as a subprocess, like `align`.
Exit codes as `align`: 0 done, 2 bad input (one line on stderr), 1 a non-finite metric (nothing written).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="align-checkpoints", description=__doc__.splitlines()[0])
    ap.add_argument("adapter_dir", help="a run's adapter directory (manifest.json, checkpoints/)")
    args = ap.parse_args(argv)
    from aligner.data import SnapshotError
    from aligner.train import evaluate_checkpoints

    try:
        if not (Path(args.adapter_dir) / "manifest.json").is_file():
            raise SnapshotError(f"{args.adapter_dir} holds no manifest.json")
        manifest = evaluate_checkpoints(args.adapter_dir)
    except (SnapshotError, OSError, KeyError) as e:
        print(f"align-checkpoints: error: {e!s} ({type(e).__name__})", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"align-checkpoints: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"event": "done", "seconds": manifest.get("checkpoint_eval_seconds"),
                      "evaluated": [c["step"] for c in manifest.get("checkpoints") or []
                                    if c.get("heldout_new") is not None]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
