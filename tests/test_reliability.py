"""Memory bounds of streamed prediction, and freshness of the generated docs/reliability.md.

The memory test runs prediction in a subprocess and reads its RSS high-water mark
(``ru_maxrss``) before and after: the extra peak must stay below

    bound = 4 * B * C * 4 bytes   (a few [B, C] float32 score blocks: scores, + bias, top-k work)
          + N * k * 12 bytes      (the [N, k] int64 ids + float32 scores output)
          + 64 MiB                (allocator and lazy-import slack)

with ``B`` rows and ``C`` labels per block. A dense ``[N, L]`` score matrix would be N*L*4
bytes (40 GB for 1e4 x 1e6), far above the bound.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from reliability import case, declared_cases, recorded, reliability  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]

_MEM_SCRIPT = r"""
import json, resource, sys
import numpy as np, scipy.sparse as sp, torch
from xmc_toolkit.train import TrainConfig, XMCNetwork, predict_topk_network
N, L, B, C = (int(a) for a in sys.argv[1:5])
D, d, k = 64, 16, 5
torch.manual_seed(0)
net = XMCNetwork(D, L, TrainConfig(dim=d, linear_only=True, hidden=(16,)))
X = sp.random(N, D, density=0.1, format="csr", dtype=np.float32, random_state=0)
predict_topk_network(net, X[:2], k, batch_size=B, chunk_size=C)  # warm up kernels / imports
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
ids, scores = predict_topk_network(net, X, k, batch_size=B, chunk_size=C)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
assert ids.shape == (N, k)
print(json.dumps({"extra": peak - base, "dense": N * L * 4}))
"""


def _bound(N: int, B: int, C: int, k: int = 5) -> int:
    return 4 * B * C * 4 + N * k * 12 + 64 * 2**20


def _measure(N: int, L: int, B: int, C: int) -> dict[str, int]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, str(N), str(L), str(B), str(C)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


MEM_FAST = case("memory bounds", "top-5 of 2e5 labels for 500 queries (d=16), blocks 256 x 8192",
                "extra peak RSS < 4 blocks + output + 64 MiB (= 96 MiB)")
MEM_SLOW = case("memory bounds", "top-5 of 1e6 labels for 1e4 queries (d=16), blocks 256 x "
                "8192 (slow)", "extra peak RSS < 4 blocks + output + 64 MiB (= 97 MiB); a "
                "dense score matrix would need 40 GB")


def test_streamed_prediction_memory_bound(reliability) -> None:
    N, L, B, C = 500, 200_000, 256, 8192
    m = _measure(N, L, B, C)
    bound = _bound(N, B, C)
    assert m["extra"] < bound, (m, bound)
    reliability.record(MEM_FAST, f"extra peak {m['extra'] / 2**20:.0f} MiB < bound "
                       f"{bound / 2**20:.0f} MiB (dense scores: {m['dense'] / 2**20:.0f} MiB)")


@pytest.mark.slow
def test_streamed_prediction_memory_bound_1e6_labels(reliability) -> None:
    N, L, B, C = 10_000, 1_000_000, 256, 8192
    m = _measure(N, L, B, C)
    bound = _bound(N, B, C)
    assert m["extra"] < bound, (m, bound)
    reliability.record(MEM_SLOW, f"extra peak {m['extra'] / 2**20:.0f} MiB < bound "
                       f"{bound / 2**20:.0f} MiB (dense scores: {m['dense'] / 2**30:.0f} GiB)")


# ------------------------------------------------------------------------------------------------
# docs/reliability.md is generated from the recorded cases (keep this test last in the file)
# ------------------------------------------------------------------------------------------------
def _generator():
    spec = importlib.util.spec_from_file_location("gen_reliability_doc",
                                                  REPO / "scripts" / "gen_reliability_doc.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_reliability_doc_is_current() -> None:
    """Fails when docs/reliability.md differs from what the recorded cases render to.

    With every declared case recorded in this process (the three reliability files ran
    together, this one last) the whole document is compared; otherwise (a subset of tests, or
    xdist workers) only the list of cases and expected outcomes is compared.
    """
    if os.environ.get("XMC_RELIABILITY_LOG"):
        pytest.skip("scripts/gen_reliability_doc.py is regenerating the document")
    import test_faults  # noqa: F401  (declares its cases)
    import test_fuzz_loaders  # noqa: F401
    import test_work_safety  # noqa: F401

    gen = _generator()
    cases = [{"category": c.category, "case": c.name, "expected": c.expected}
             for c in declared_cases()]
    doc = gen.DOC.read_text() if gen.DOC.exists() else ""
    fix = "run: python scripts/gen_reliability_doc.py"
    obs = recorded()
    runnable = [c for c in cases if c["case"] not in (MEM_SLOW.name,)
                and "(CUDA)" not in c["case"]]
    if all(f"{c['category']} / {c['case']}" in obs for c in runnable):
        # slow / GPU cases not run here keep the observation already in the document
        merged = gen.previous_observations(doc, cases)
        # a measured peak depends on what ran earlier in the process (ru_maxrss is a
        # high-water mark): its test asserts the bound; the document keeps the observation
        # gen_reliability_doc.py recorded
        merged.update({k: v for k, v in obs.items() if k not in (MEM_FAST.key, MEM_SLOW.key)})
        assert gen.render(cases, merged) == doc, f"docs/reliability.md is out of date; {fix}"
    else:
        for c in cases:
            row = f"| {gen._cell(c['case'])} | {gen._cell(c['expected'])} |"
            assert row in doc, f"case {c['case']!r} missing from docs/reliability.md; {fix}"
