"""Next-item language model trained with MIDX sampled softmax vs the full softmax.

A worked example that the toolkit's samplers and losses plug into any PyTorch model: a GRU
next-token model over a generated corpus with a Zipfian vocabulary of ``--vocab`` tokens grouped in
``--clusters`` topics (a sequence mostly stays in its topic, sometimes moves to the "next" topic,
rarely jumps anywhere), trained three ways for the same number of steps:

* ``full``    -- exact softmax over the whole vocabulary (``full_softmax_loss``, chunked);
* ``midx``    -- ``MIDXSampler`` proposal (codebooks refreshed every ``--refresh`` steps) +
  ``sampled_softmax_loss`` with the exact log-q correction;
* ``uniform`` -- ``UniformSampler`` + the same loss (the baseline an adaptive sampler must beat).

Each run reports test perplexity (exact, full softmax), Recall@10 and milliseconds per training
step. Run ``python examples/lm_midx.py --help``; defaults take a couple of minutes on a CPU.
See docs/example-lm.md for a walk-through and measured numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from xmc_toolkit.losses import full_softmax_loss, sampled_softmax_loss

try:  # public location
    from xmc_toolkit.sampling import MIDXSampler, UniformSampler
except ImportError:  # pragma: no cover - while the package __init__ is being written
    from xmc_toolkit.sampling.midx import MIDXSampler
    from xmc_toolkit.sampling.static import UniformSampler


@dataclass
class LMConfig:
    """Hyper-parameters of the example (all settable from the command line)."""

    vocab: int = 20000
    clusters: int = 200
    zipf: float = 1.05
    stay: float = 0.75
    move: float = 0.2
    num_seqs: int = 40000
    seq_len: int = 20
    dim: int = 64
    batch: int = 32
    steps: int = 500
    lr: float = 3e-3
    samples: int = 256
    refresh: int = 50
    codewords: int = 32
    eval_rows: int = 4000
    chunk_size: int = 8192
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads (0: torch default)
    sparse_out: bool = False  # sampled modes: sparse output table + SparseAdam
    modes: list[str] = field(default_factory=lambda: ["full", "midx", "uniform"])


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------


def _generate(cfg: LMConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens ``[N, T + 1]``, hidden topics ``[N, T + 1]`` and the true ``[C, V]`` next-token law.

    Tokens get a global Zipf popularity and a random topic. A sequence starts in a random topic;
    at each step it stays in its topic (``stay``), moves to topic ``c + 1`` (``move``) or jumps to
    a random topic, then emits a token of that topic with probability proportional to its
    popularity. ``law[k]`` is the distribution of the next token when the current topic is ``k``.
    """
    rng = np.random.default_rng(cfg.seed)
    v, c = cfg.vocab, cfg.clusters
    pop = 1.0 / np.arange(1, v + 1) ** cfg.zipf  # [V] global Zipf weights
    topic = rng.integers(0, c, size=v)  # [V] topic of each token
    order = np.argsort(topic, kind="stable")  # tokens sorted by topic
    t_sorted = topic[order]
    w = pop[order]
    # Per-topic CDF laid out on (k, k + 1] for topic k, so one searchsorted serves all topics.
    totals = np.bincount(t_sorted, weights=w, minlength=c)  # [C]
    cum = np.cumsum(w) - np.concatenate([[0.0], np.cumsum(totals)[:-1]])[t_sorted]  # within-topic
    cdf = t_sorted + cum / totals[t_sorted]  # [V] increasing
    n, length = cfg.num_seqs, cfg.seq_len + 1
    state = rng.integers(0, c, size=n)  # [N] current topic
    out = np.empty((n, length), dtype=np.int64)
    states = np.empty((n, length), dtype=np.int64)
    for pos in range(length):  # generating data, not a hot path
        u = rng.random(n)
        jump = rng.integers(0, c, size=n)
        moved = np.where(u < cfg.stay + cfg.move, (state + 1) % c, jump)
        state = np.where(u < cfg.stay, state, moved)
        idx = np.searchsorted(cdf, state + rng.random(n) * (1 - 1e-12), side="right")
        out[:, pos] = order[np.minimum(idx, v - 1)]
        states[:, pos] = state
    within = np.zeros((c, v))  # [C, V] p(token | topic)
    within[topic, np.arange(v)] = pop / totals[topic]
    jump_p = 1.0 - cfg.stay - cfg.move
    law = cfg.stay * within + cfg.move * np.roll(within, -1, axis=0) + jump_p * within.sum(0) / c
    return out, states, law


def make_corpus(cfg: LMConfig) -> Tensor:
    """Generate ``[num_seqs, seq_len + 1] int64`` token sequences with clustered Zipf structure."""
    return torch.from_numpy(_generate(cfg)[0])


def oracle_metrics(cfg: LMConfig) -> dict[str, float]:
    """Perplexity and Recall@10 of the true next-token law given the hidden topic.

    A lower bound on what a model can reach (the model sees tokens, not topics), computed on the
    same test positions as :func:`evaluate`.
    """
    tokens, states, law = _generate(cfg)
    n_test = max(1, tokens.shape[0] // 10)
    y = tokens[:n_test, 1:].reshape(-1)[: cfg.eval_rows]  # [R] next tokens
    s = states[:n_test, :-1].reshape(-1)[: cfg.eval_rows]  # [R] topic before each of them
    p = law[s, y]
    top = np.argpartition(-law, 10, axis=1)[:, :10]  # [C, 10]
    hit = (top[s] == y[:, None]).any(1)
    return {"ppl": float(np.exp(-np.log(p).mean())), "R@10": float(hit.mean())}


# ------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------


class NextItemModel(nn.Module):
    """Token embedding -> GRU -> query; a separate output label table ``[V, d]`` plus bias.

    With ``sparse_out=True`` the output table and bias are ``nn.Embedding(..., sparse=True)`` so
    a sampled loss touches (and ``SparseAdam`` updates) only the scored rows; worth it for large
    vocabularies (measured: a loss at V = 20k on CPU, a win at V = 500k on GPU, see
    docs/example-lm.md). The full softmax needs every row anyway and uses dense gradients.
    """

    def __init__(self, vocab: int, dim: int, sparse_out: bool = False) -> None:
        super().__init__()
        self.inp = nn.Embedding(vocab, dim)
        self.gru = nn.GRU(dim, dim, batch_first=True)
        self.proj = nn.Linear(dim, dim)
        self.out = nn.Embedding(vocab, dim, sparse=sparse_out)  # label (output) embeddings
        self.out_b = nn.Embedding(vocab, 1, sparse=sparse_out)  # label bias, [V, 1]
        nn.init.normal_(self.out.weight, std=0.05)
        nn.init.zeros_(self.out_b.weight)

    @property
    def out_bias(self) -> Tensor:
        """``[V]`` view of the label bias."""
        return self.out_b.weight[:, 0]

    def forward(self, tokens: Tensor) -> Tensor:
        """``tokens [B, T] int64`` -> queries ``[B, T, d]``."""
        h, _ = self.gru(self.inp(tokens))  # [B, T, d]
        return self.proj(h)  # [B, T, d]

    def score_ids(self, queries: Tensor, ids: Tensor) -> Tensor:
        """``queries [N, d]``, ``ids [N, K]`` -> scores ``[N, K]`` (no ``[V, d]`` temporary)."""
        return torch.einsum("nd,nkd->nk", queries, self.out(ids)) + self.out_b(ids)[..., 0]


# ------------------------------------------------------------------------------------------
# training and evaluation
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: NextItemModel, data: Tensor, cfg: LMConfig) -> dict[str, float]:
    """Exact test perplexity and Recall@10 over the first ``eval_rows`` (position) targets."""
    model.eval()
    q = model(data[:, :-1])  # [N, T, d]
    q = q.reshape(-1, q.shape[-1])[: cfg.eval_rows]  # [R, d]
    y = data[:, 1:].reshape(-1)[: cfg.eval_rows]  # [R]
    ones = torch.ones(y.shape[0], 1, dtype=torch.bool, device=y.device)
    ce = full_softmax_loss(q, model.out.weight, y[:, None], ones, model.out_bias, cfg.chunk_size)
    hits = 0
    for s in range(0, q.shape[0], 512):
        scores = q[s : s + 512] @ model.out.weight.t() + model.out_bias  # [r, V]
        top = scores.topk(10, dim=1).indices  # [r, 10]
        hits += int((top == y[s : s + 512, None]).any(1).sum())
    model.train()
    return {"ppl": math.exp(float(ce)), "R@10": hits / q.shape[0]}


def train(mode: str, train_data: Tensor, test_data: Tensor, cfg: LMConfig) -> dict[str, float]:
    """Train one model with ``mode`` in ``{"full", "midx", "uniform"}``; return its metrics."""
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    sparse = cfg.sparse_out and mode != "full"
    model = NextItemModel(cfg.vocab, cfg.dim, sparse_out=sparse).to(dev)
    table = [model.out.weight, model.out_b.weight]
    rest = [p for n, p in model.named_parameters() if not n.startswith("out")]
    opts: list[torch.optim.Optimizer] = [torch.optim.Adam(rest, lr=cfg.lr)]
    table_opt = torch.optim.SparseAdam if sparse else torch.optim.Adam
    opts.append(table_opt(table, lr=cfg.lr))
    gen = torch.Generator(device=dev).manual_seed(cfg.seed + 1)
    sampler = None
    if mode == "midx":
        sampler = MIDXSampler(cfg.vocab, num_codewords=cfg.codewords, quantizer="pq", seed=cfg.seed)
    elif mode == "uniform":
        sampler = UniformSampler(cfg.vocab)
    elif mode != "full":
        raise ValueError(f"unknown mode {mode!r}; use full, midx or uniform")
    step_time = refresh_time = 0.0
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        if mode == "midx" and step % cfg.refresh == 0:
            sampler.update(model.out.weight.detach(), model.out_bias.detach())
            refresh_time += time.perf_counter() - t0
        rows = torch.randint(0, train_data.shape[0], (cfg.batch,), generator=gen, device=dev)
        batch = train_data[rows]  # [B, T + 1]
        q = model(batch[:, :-1]).reshape(-1, cfg.dim)  # [B*T, d]
        y = batch[:, 1:].reshape(-1, 1)  # [B*T, 1]: one positive per position
        mask = torch.ones_like(y, dtype=torch.bool)
        if mode == "full":
            loss = full_softmax_loss(q, model.out.weight, y, mask, model.out_bias, cfg.chunk_size)
        else:
            smp = sampler.sample(q.detach(), cfg.samples, generator=gen)  # ids, log_q [B*T, M]
            pos_log_q = sampler.log_prob(q.detach(), y)  # [B*T, 1]
            loss = sampled_softmax_loss(
                model.score_ids(q, y), y, mask, pos_log_q,
                model.score_ids(q, smp.ids), smp.ids, smp.log_q,
            )
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # honest per-step wall clock
        step_time += time.perf_counter() - t0
    metrics = evaluate(model, test_data, cfg)
    metrics["ms_per_step"] = 1e3 * step_time / max(cfg.steps, 1)
    metrics["refresh_ms_total"] = 1e3 * refresh_time
    metrics["final_train_loss"] = float(loss.detach())
    return metrics


def run(cfg: LMConfig) -> dict[str, dict[str, float]]:
    """Generate the corpus, train every mode in ``cfg.modes`` and return their metrics."""
    data = make_corpus(cfg).to(cfg.device)  # [N, T + 1]
    n_test = max(1, data.shape[0] // 10)
    train_data, test_data = data[n_test:], data[:n_test]
    results = {mode: train(mode, train_data, test_data, cfg) for mode in cfg.modes}
    results["oracle"] = oracle_metrics(cfg)
    return results


def parse_args(argv: list[str] | None = None) -> LMConfig:
    cfg = LMConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, value in asdict(cfg).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, list):
            p.add_argument(flag, default=",".join(value), help="comma-separated: full,midx,uniform")
        elif isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            p.add_argument(flag, type=type(value), default=value)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    ns = vars(p.parse_args(argv))
    out = ns.pop("json")
    ns["modes"] = [m for m in ns["modes"].split(",") if m]
    cfg = LMConfig(**ns)
    cfg.__dict__["_json"] = out
    return cfg


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    cfg = parse_args(argv)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    results = run(cfg)
    print(f"vocab={cfg.vocab} clusters={cfg.clusters} steps={cfg.steps} "
          f"batch={cfg.batch}x{cfg.seq_len}"
          f" M={cfg.samples} K={cfg.codewords} refresh={cfg.refresh} sparse_out={cfg.sparse_out}")
    print(f"{'mode':8s} {'test ppl':>10s} {'R@10':>7s} {'ms/step':>9s} {'refresh ms':>11s}")
    for mode, m in results.items():
        if mode == "oracle":
            print(f"{mode:8s} {m['ppl']:10.1f} {m['R@10']:7.3f}   (true law, hidden topic known)")
        else:
            print(f"{mode:8s} {m['ppl']:10.1f} {m['R@10']:7.3f} {m['ms_per_step']:9.1f} "
                  f"{m['refresh_ms_total']:11.0f}")
    path = cfg.__dict__.get("_json")
    if path:
        with open(path, "w") as f:
            json.dump({"config": asdict(cfg), "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
