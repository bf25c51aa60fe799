"""One rank's share of the per-document LoRA TTT pass at full size, timed on this one device.

    DATA_DIR=... [TIMING_WORLD=8] [TIMING_TOKENS=45514753] [VAR=VALUE ...] \\
        python3 scripts/lora_ttt_timing.py [ARTIFACT]

The stream is the validation shard's documents repeated to TIMING_TOKENS tokens (the real set's
size by default; real document lengths, which set the pass's cost). This process plays rank 0 of a
TIMING_WORLD-GPU run: it scores exactly the batches that rank would (the plan is the same on every
rank), with the phases' global SGD on its share of each step and no collectives. It logs the plan's
cost of every rank (the slowest rank sets the wall clock) and the seconds from reading ARTIFACT to
the pass's last line, compile warm-up included. Without ARTIFACT the model is a random init of the
configured shape: the same work, a meaningless score. The settings are train_gpt.py's (TTT_LORA_*,
PHASED_TTT_*, NGRAM_TILT, ...). Timing only: on the bench the artifact was trained on text like this.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def rank_costs(h: tg.Hyperparameters, docs: list[tuple[int, int]], world: int) -> list[int]:
    """Window tokens each rank computes over the pass (its phases' batches), from the shared plan."""
    C, L = h.ttt_chunk_size, h.eval_seq_len
    cost = [0] * world
    for _, d0, d1, _ in tg.plan_phases(len(docs), h.phased_ttt_prefix_docs, h.phased_ttt_num_phases):
        for r in range(world):
            for b in tg.lora_batches(docs[d0:d1], h, tg.Runtime(rank=r, world_size=world)):
                cost[r] += sum(min((c + 1) * C, L) for s, e in b for c in range(-(-(e - s) // C)))
    return cost


def env_int(name: str, default: int, low: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise tg.ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < low:
        raise tg.ConfigError(f"{name}={value} must be at least {low}")
    return value


def main(argv: list[str]) -> int:
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print(__doc__, file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        world = env_int("TIMING_WORLD", 8, 1)
        if 8 % world:
            raise tg.ConfigError(f"TIMING_WORLD={world} must divide 8")
        n_tokens = env_int("TIMING_TOKENS", 45_514_753, 2)
        h = tg.Hyperparameters.from_env()
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        rt = tg.Runtime(rank=0, world_size=world, device=device)
        tg.configure_logging(f"logs/lora_ttt_timing_w{world}.txt", True)
        if rt.is_cuda:
            torch.cuda.set_device(device)
            torch._dynamo.config.cache_size_limit = 64
        if argv:
            blob = tg.read_artifact(argv[0])
            model = tg.load_model_from_artifact(h, rt, blob, argv[0])
        else:
            model = tg.build_model(h, rt)
            model.recurrence_active = h.num_loops > 0
        read_s = time.perf_counter() - t0
        val = tg.load_validation_tokens(h)
        luts = tg.build_byte_luts(tg.load_tokenizer(h), h.vocab_size, rt.device)
    except (tg.ConfigError, tg.DataError, tg.ArtifactError) as e:
        print(f"lora_ttt_timing: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    tokens = val.repeat(-(-n_tokens // val.numel()))[:n_tokens]
    docs = tg.find_documents(tokens)
    cost = rank_costs(h, docs, world)
    tg.log(f"timing: model:{argv[0] if argv else 'random init'} read:{read_s:.1f}s tokens:{n_tokens} "
           f"docs:{len(docs)} world:{world} (this process: rank 0) batch_docs:{h.ttt_batch_size} "
           f"ngram:{int(h.ngram_tilt)}")
    tg.log(f"timing: window tokens per rank: rank0:{cost[0]} max:{max(cost)} mean:{sum(cost) / world:.0f} "
           f"(slowest/rank0 {max(cost) / max(cost[0], 1):.3f})")
    if rt.is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    _, bpb = tg.eval_lora_ttt(h, rt, model, tokens, luts, use_ngram=h.ngram_tilt)
    tg.sync(rt.device)
    total = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if rt.is_cuda else 0.0
    tg.log(f"timing: rank0 total:{total:.1f}s (artifact read to the last score, compile included) "
           f"val_bpb:{bpb:.5f} peak_memory:{peak:.1f}GiB")
    tg.log(f"timing: slowest rank, projected from its plan cost: {total * max(cost) / max(cost[0], 1):.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
