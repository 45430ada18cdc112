"""Every concept's ceiling (issue 35, item 1): its 5 instance images through the VAE of the model,
scored for the subject by scorer v2 (and v1 beside it); concepts below the threshold stated in
benchmarks/micro/README.md (``scorer.CEILING_THRESHOLD``) are flagged.

    cd benchmarks/micro
    python ceilings.py --model ../../models/microworld-sdxl-v2 --out v2/ceilings.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dreamcoeff.testing import microworld as mw
from dreamcoeff.testing import scorer as sc

HERE = Path(__file__).resolve().parent


def ceilings(model: str) -> dict:
    """{set: {concept: v2 ceiling row (+ the v1 scorer's ceiling as ``ceiling_v1``)}} for every concept set."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    out = {}
    for name, concepts in mw.CONCEPT_SETS.items():
        out[name] = {}
        for c in concepts:
            row = sc.concept_ceiling(vae, c, "v2")
            row["ceiling_v1"] = sc.concept_ceiling(vae, c, "v1")["ceiling"]
            out[name][c.name] = row
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(HERE.parents[1] / "models" / "microworld-sdxl-v2"))
    p.add_argument("--out", default=str(HERE / "v2" / "ceilings.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sets = ceilings(args.model)
    result = {
        "scorer": "v2",
        "threshold": sc.CEILING_THRESHOLD,
        "rule": "a concept whose ceiling is below the threshold is flagged: reported, left out of means "
        "(benchmarks/micro/README.md, 'Ceiling and its threshold')",
        "command": f"python ceilings.py --model {args.model} --out {args.out}",
        "model": Path(args.model).name,
        "sets": sets,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for name, rows in sets.items():
        for cname, r in rows.items():
            flag = "  FLAGGED" if r["flagged"] else ""
            print(f"{name:14s} {cname:24s} ceiling {r['ceiling']:.1f} (v1 scorer {r['ceiling_v1']:.1f}){flag}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
