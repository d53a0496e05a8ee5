"""acfrec next to RecBole on one ML-100K leave-one-out split (full ranking, HR@10 / NDCG@10).

The split is made by acfrec (latest interaction = test, ties keep file order) and exported as
RecBole atomic files, so both systems score exactly the same held-out items. RecBole runs in its
own virtualenv (it pins numpy<2 / pandas<3), built by ``../shared/peers/recbole/setup.sh``.

    python benchmarks/peer_recbole.py [--data PATH.inter] [--recbole-python PY] [--models BPR FISM]
    python benchmarks/peer_recbole.py --recbole-results recbole.jsonl   # reuse an earlier RecBole run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DEFAULT_DATA = SHARED / "data" / "ml-100k" / "ml-100k.inter"
RECBOLE_TO_ACFREC = {"Pop": "itempop", "BPR": "bpr-mf", "FISM": "fism"}


def run_recbole(python: str, folder: Path, name: str, models: list[str]) -> list[dict]:
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    command = [python, str(SHARED / "peers" / "recbole" / "run.py"), str(folder), name, "full", *models]
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"RecBole failed:\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def run_acfrec(split, names: list[str]) -> list[dict]:
    from acfrec.eval.evaluate import evaluate
    from acfrec.models import get_model

    rows = []
    for name in names:
        start = time.perf_counter()
        model_cls = get_model(name)
        quiet = {"progress": False} if "progress" in model_cls.config_class.__dataclass_fields__ else {}
        model = model_cls(**quiet)
        model.fit(split)
        metrics = evaluate(model, split, protocols=("full",), ks=(10,)).metrics["full"]
        rows.append({"model": name, "hr@10": metrics["HR@10"], "ndcg@10": metrics["NDCG@10"],
                     "seconds": time.perf_counter() - start})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--recbole-python", help="python of the RecBole venv (default: build it with setup.sh)")
    parser.add_argument("--recbole-results", type=Path, help="JSON lines of an earlier RecBole run on this split")
    parser.add_argument("--models", nargs="+", default=["Pop", "BPR", "FISM"])
    args = parser.parse_args()

    from acfrec.data.io import read_interactions
    from acfrec.data.splitting import leave_one_out

    split = leave_one_out(read_interactions(args.data))
    print(f"split {split.fingerprint}: {split.summary()}")
    if args.recbole_results:
        recbole = [json.loads(line) for line in args.recbole_results.read_text().splitlines() if line.strip()]
    else:
        python = args.recbole_python or subprocess.run(
            ["bash", str(SHARED / "peers" / "recbole" / "setup.sh")], capture_output=True, text=True, check=True
        ).stdout.strip().splitlines()[-1]
        folder = Path(tempfile.mkdtemp(prefix="acfrec-peer-"))
        name = "acfrec-ml100k"
        split.export_recbole(folder / name, name)
        recbole = run_recbole(python, folder, name, args.models)
    ours = run_acfrec(split, [RECBOLE_TO_ACFREC[r["model"]] for r in recbole if r["model"] in RECBOLE_TO_ACFREC])
    print(f"\n{'system':<9}{'model':<10}{'HR@10':>8}{'NDCG@10':>9}{'seconds':>9}")
    for system, rows in (("RecBole", recbole), ("acfrec", ours)):
        for r in rows:
            print(f"{system:<9}{r['model']:<10}{r['hr@10']:>8.4f}{r['ndcg@10']:>9.4f}{r['seconds']:>9.1f}")


if __name__ == "__main__":
    sys.exit(main())
