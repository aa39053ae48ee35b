"""Train a tiny causal language model whose output head is a FIXED bank (one unit vector per token) with a
learnable temperature, on (B, T, d) hidden states -- the fused loss never builds the (B, T, V) logits.

    python examples/train_lm_head.py [--vocab 256] [--dim 64] [--steps 300] [--device cpu]

Data: token streams from a random second-order rule: with probability 1 - noise the next token is
rule[x_{t-2} mod 2, x_{t-1}] (two fixed random permutations of the vocabulary, chosen by the parity of the token
two back: the model needs both previous tokens), else a uniformly random token. The best possible next-token
accuracy is (1 - noise) + noise / V (about 0.90 at the defaults); chance is 1 / V.
Model: token embedding -> causal depthwise+pointwise convolution over the last 3 tokens -> MLP -> (B, T, d)
features, trained with etfkern.nn.EBVHead(bank, learnable_tau=True): the bank is a fixed EBV bank
(etfkern.ebv_bank), tau = exp(log_tau) is the only head parameter. The first position of every sequence has
no full context and is left out with ignore_index=-100, as a language model masks padding. Prints held-out
loss, next-token accuracy (greedy: EBVHead.predict on (B, T, d)) and tau every 50 steps; at the defaults the
accuracy went from 0.002 to 0.844 (best possible 0.900) and tau from 0.1 to 0.077 in 300 steps, 17 s on one
core of a shared 2-core CPU.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import etfkern

IGNORE = -100


def make_batch(rule: torch.Tensor, batch: int, length: int, noise: float, gen: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, T), next-token targets (B, T)) from the rule (2, V); targets at t=0 are IGNORE."""
    vocab = rule.shape[1]
    seq = torch.empty(batch, length + 1, dtype=torch.long)
    seq[:, :2] = torch.randint(0, vocab, (batch, 2), generator=gen)
    for t in range(2, length + 1):
        follow = rule[seq[:, t - 2] % 2, seq[:, t - 1]]
        random = torch.randint(0, vocab, (batch,), generator=gen)
        seq[:, t] = torch.where(torch.rand(batch, generator=gen) < noise, random, follow)
    tokens, targets = seq[:, :-1], seq[:, 1:].clone()
    targets[:, 0] = IGNORE  # the first prediction sees one token only: masked as a language model masks padding
    return tokens, targets


class TinyCausalLM(nn.Module):
    """Embedding -> causal convolution (each position sees itself and the 2 tokens before) -> MLP: (B, T, d)."""

    def __init__(self, vocab: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Conv1d(dim, hidden, kernel_size=3)
        self.out = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens).transpose(1, 2)  # (B, d, T)
        h = self.mix(nn.functional.pad(h, (2, 0)))  # left padding only: position t never sees t+1
        return self.out(h.transpose(1, 2))  # (B, T, d)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--tau", type=float, default=0.1, help="initial temperature (learned)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    bank = etfkern.ebv_bank(args.vocab, args.dim, seed=args.seed)
    # the model and the data draw from streams of their own: a model initialised from the bank's stream could
    # start with embedding rows equal to bank rows
    torch.manual_seed(args.seed + 1)
    gen = torch.Generator().manual_seed(args.seed + 1_000_003)
    rule = torch.stack([torch.randperm(args.vocab, generator=gen) for _ in range(2)])
    dev = torch.device(args.device)

    model = TinyCausalLM(args.vocab, args.dim, args.hidden).to(dev)
    head = etfkern.nn.EBVHead(bank, tau=args.tau, learnable_tau=True).to(dev)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=args.lr, weight_decay=1e-4)
    val_tokens, val_targets = make_batch(rule, 64, args.length, args.noise, gen)
    val_tokens, val_targets = val_tokens.to(dev), val_targets.to(dev)

    history: dict = {"step": [], "loss": [], "acc": [], "tau": []}
    start = time.perf_counter()
    for step in range(args.steps + 1):  # step 0: the untrained model
        if step % args.log_every == 0 or step == args.steps:
            with torch.no_grad():
                features = model(val_tokens)
                val_loss = float(head(features, val_targets))
                pred = head.predict(features)  # (B, T) greedy next tokens
                keep = val_targets != IGNORE
                acc = float((pred == val_targets)[keep].float().mean())
            tau = float(head.tau.detach())
            for key, value in (("step", step), ("loss", val_loss), ("acc", acc), ("tau", tau)):
                history[key].append(value)
            print(f"step {step:4d}  held-out loss {val_loss:.3f}  next-token acc {acc:.3f}  tau {tau:.4f}  "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
        if step == args.steps:
            break
        tokens, targets = make_batch(rule, args.batch, args.length, args.noise, gen)
        features = model(tokens.to(dev))  # (B, T, d)
        loss = head(features, targets.to(dev))  # fused: no (B, T, V) logits; mean over non-ignored positions
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    best = (1 - args.noise) + args.noise / args.vocab
    print(f"vocab {args.vocab}, d {args.dim}: accuracy {history['acc'][-1]:.3f} (best possible {best:.3f}, "
          f"chance {1 / args.vocab:.4f}); tau learned {args.tau} -> {history['tau'][-1]:.4f}")
    return history


if __name__ == "__main__":
    main()
