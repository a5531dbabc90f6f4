"""Peak memory of the log-prob head: full logits vs ``chunked_token_logprobs``.

    python -m benchmarks.logprob_memory [--tokens 2048 --hidden 64 --vocab 32768]

The bytes per logit that ``pipelines/runtime/memory.py`` charges for the "logits" term
come from here. A dispatch mode counts the live tensor storage of every op
over the forward and backward of the head alone (bf16 hidden states and LM
head, as under FSDP2's bf16 mixed precision), which is what a GPU's caching
allocator must hold at least; CPU is fine for it, since it counts bytes, not
time. Times are printed too but mean little on a shared CPU.

Prints a table and writes ``benchmarks/results/logprob-memory-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from actors.logprobs import chunked_token_logprobs, entropy_from_logits, token_logprobs

ROOT = Path(__file__).resolve().parents[1]


class PeakBytes(TorchDispatchMode):
    """Largest sum of live tensor storage seen while the mode is on."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)
        return out


def measure(tokens: int, hidden: int, vocab: int, chunk: int, entropy: bool) -> tuple[int, float]:
    """(peak bytes, seconds) of forward + backward of the head; chunk 0 = full logits."""
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(vocab, hidden, generator=g) * 0.02).bfloat16().requires_grad_()
    h0 = torch.randn(tokens, hidden, generator=g).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    with PeakBytes() as peak:
        start = time.perf_counter()
        h = h0 * 1  # stands for the final norm's output
        if chunk:
            logp, ent = chunked_token_logprobs(h, weight, targets, chunk, with_entropy=entropy)
        else:
            logits = torch.nn.functional.linear(h, weight)
            logp = token_logprobs(logits, targets)
            ent = entropy_from_logits(logits) if entropy else None
            del logits
        (logp.sum() + (ent.sum() if entropy else 0.0)).backward()
        seconds = time.perf_counter() - start
    return peak.peak, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 256, 1024, 2048])
    args = parser.parse_args()
    rows = []
    print(f"{args.tokens} tokens, hidden {args.hidden}, vocabulary {args.vocab}, bf16")
    print(f"{'entropy':<8}{'chunk':>7}{'peak MiB':>10}{'bytes/logit':>13}{'s':>7}")
    for entropy in (False, True):
        for chunk in args.chunks:
            peak, seconds = measure(args.tokens, args.hidden, args.vocab, chunk, entropy)
            per = peak / (min(chunk or args.tokens, args.tokens) * args.vocab)
            rows.append({"entropy": entropy, "chunk": chunk, "peak_bytes": peak,
                         "bytes_per_logit": per, "seconds": seconds})
            print(f"{entropy!s:<8}{chunk or 'full':>7}{peak / 2**20:>10.1f}{per:>13.2f}{seconds:>7.2f}")
    out = ROOT / "benchmarks" / "results" / f"logprob-memory-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
