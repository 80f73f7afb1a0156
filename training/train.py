"""Train the test model, resuming from the committed state.

    .venv-official/bin/python -m training.train --minutes 60

State lives in ``training/state/`` and is committed: ``state.pt`` (the trained weights, the auxiliary CTC
head and the optimizer's moments, a few MB) and ``log.jsonl`` (loss every 100 steps, held-out WER at
every evaluation, cumulative CPU seconds).  Training data is regenerated from fixed seeds
(``training.corpus``), so nothing else is needed to continue in a new session.  SIGTERM / Ctrl-C save
the state before exiting.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

from training import corpus
from training.model import Heads, Vocab, build_model, greedy, loss_fn, model_config, parse, wer

STATE_DIR = Path(os.environ.get("TEST_MODEL_STATE", Path(__file__).resolve().parent / "state"))
TOKENIZER_DIR_ENV = "TEST_MODEL_TOKENIZER"


def load_tokenizer():
    from transformers import AutoTokenizer

    path = os.environ.get(TOKENIZER_DIR_ENV)
    if not path:
        raise SystemExit(
            f"set {TOKENIZER_DIR_ENV} to a directory with the Qwen tokenizer files "
            "(scripts/train_test_model.sh does)"
        )
    return AutoTokenizer.from_pretrained(path)


def split_files(split: str) -> list[Path]:
    """Shards of one split, or of several joined by "+" (a curriculum mix: "train_easy+train")."""
    return [p for s in split.split("+") for p in corpus.shard_files(s)]


def load_shards(split: str, limit: int | None = None) -> tuple[list[str], list[str], list[torch.Tensor]]:
    texts, kinds, feats = [], [], []
    for p in split_files(split)[:limit]:
        d = torch.load(p)
        texts += d["text"]
        kinds += d["kind"]
        feats += d["feats"]
    return texts, kinds, feats


def batches(lens: list[int], max_frames: int, rng: random.Random, batch_size: int = 0):
    """Shuffled length-bucketed batches, forever: ``batch_size`` examples each (the spike's recipe:
    sorted groups of 32 batches), or with ``batch_size`` 0 at most ``max_frames`` padded frames."""
    while True:
        idx = list(range(len(lens)))
        rng.shuffle(idx)
        out = []
        group = batch_size * 32 if batch_size else 2048
        for g in range(0, len(idx), group):
            grp = sorted(idx[g : g + group], key=lambda i: lens[i])
            if batch_size:
                out += [grp[j : j + batch_size] for j in range(0, len(grp) - batch_size + 1, batch_size)]
                continue
            cur: list[int] = []
            for i in grp:
                if cur and (len(cur) + 1) * lens[i] > max_frames:
                    out.append(cur)
                    cur = []
                cur.append(i)
            if cur:
                out.append(cur)
        rng.shuffle(out)
        yield from out


def _compact_opt(sd: dict) -> dict:
    """Adam's moments in bfloat16: the committed state stays small (weights stay float32)."""
    state = {
        k: {n: (t.to(torch.bfloat16) if torch.is_tensor(t) and t.ndim else t) for n, t in v.items()}
        for k, v in sd["state"].items()
    }
    return {"state": state, "param_groups": sd["param_groups"]}


def _expand_opt(sd: dict) -> dict:
    state = {
        k: {n: (t.float() if torch.is_tensor(t) and t.ndim else t) for n, t in v.items()}
        for k, v in sd["state"].items()
    }
    return {"state": state, "param_groups": sd["param_groups"]}


class Trainer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.tok = load_tokenizer()
        self.words = corpus.load_words()
        self.vocab = Vocab(self.tok, self.words)
        saved = torch.load(STATE_DIR / "state.pt") if (STATE_DIR / "state.pt").exists() else None
        arch = saved["arch"] if saved else json.loads(args.arch)
        self.cfg = model_config(arch)
        self.arch = arch
        torch.manual_seed(args.seed)
        self.model = build_model(self.cfg)
        h = self.cfg["thinker_config"]["text_config"]["hidden_size"]
        self.heads = Heads(self.vocab.K, h)
        self.ctc_head = torch.nn.Linear(h, self.vocab.K + 1)
        params = [p for p in self.model.parameters() if p.requires_grad]
        params += list(self.heads.parameters()) + list(self.ctc_head.parameters())
        self.params = params
        decay = [p for p in params if p.ndim >= 2]
        nodecay = [p for p in params if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.01}, {"params": nodecay, "weight_decay": 0.0}],
            lr=args.lr,
            betas=(0.9, 0.98),
            eps=1e-9,
        )
        self.step = 0
        self.cpu_s = 0.0
        self.wall_s = 0.0
        if saved:
            if saved["vocab"] != self.vocab.full:
                raise SystemExit(
                    "the word list changed since the state was saved (vocabulary growth is not wired yet)"
                )
            self.model.load_state_dict(saved["model"], strict=False)
            self.heads.load_state_dict(saved["heads"])
            self.ctc_head.load_state_dict(saved["ctc_head"])
            self.opt.load_state_dict(_expand_opt(saved["opt"]))
            self.step, self.cpu_s, self.wall_s = saved["step"], saved["cpu_s"], saved["wall_s"]
        n_tr = sum(p.numel() for p in params) - sum(p.numel() for p in self.ctc_head.parameters())
        self.log(
            {
                "event": "start",
                "step": self.step,
                "cpu_h": self.cpu_s / 3600,
                "trained_params": n_tr,
                "K": self.vocab.K,
                "arch": arch,
                "threads": torch.get_num_threads(),
            }
        )

    def log(self, rec: dict) -> None:
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **rec}
        print(json.dumps(rec), flush=True)
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        with open(STATE_DIR / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def lr_at(self) -> float:
        a = self.a
        pr = min(max(self.cpu_s / 3600 - a.cycle_start_cpu_h, 0.0) / a.planned_cpu_h, 1.0)
        if a.cycle_start_cpu_h == 0:
            warm = min(1.0, (self.step + 1) / a.warmup)
            return a.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * pr)))
        # A later cycle starts from trained weights and warm Adam moments: it rises from the floor over
        # its first tenth instead of from zero over --warmup steps.
        rise = min(1.0, pr / 0.1)
        return a.lr * (0.05 + 0.95 * rise * 0.5 * (1 + math.cos(math.pi * pr)))

    def save(self) -> None:
        trained = {
            k: v for k, v in self.model.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k
        }
        st = {
            "arch": self.arch,
            "vocab": self.vocab.full,
            "model": trained,
            "heads": self.heads.state_dict(),
            "ctc_head": self.ctc_head.state_dict(),
            "opt": _compact_opt(self.opt.state_dict()),
            "step": self.step,
            "cpu_s": self.cpu_s,
            "wall_s": self.wall_s,
        }
        tmp = STATE_DIR / "state.pt.tmp"
        torch.save(st, tmp)
        os.replace(tmp, STATE_DIR / "state.pt")

    def evaluate(self, sets: dict[str, tuple[list[str], list[str], list[torch.Tensor]]]) -> dict:
        self.model.eval()
        t0 = time.time()
        res: dict = {"event": "eval", "step": self.step, "cpu_h": round(self.cpu_s / 3600, 3)}
        for name, (texts, kinds, feats) in sets.items():
            hyps: list[str] = []
            for i in range(0, len(texts), 25):
                hyps += greedy(self.model, self.heads, self.vocab, [f.float() for f in feats[i : i + 25]])
            txt = [parse(h) for h in hyps]
            res[f"{name}_wer"] = round(wer(texts, txt), 4)
            for kind in ("whole", "cut", "long"):
                sel = [i for i, k in enumerate(kinds) if k == kind]
                if sel:
                    res[f"{name}_{kind}_wer"] = round(wer([texts[i] for i in sel], [txt[i] for i in sel]), 4)
            res[f"{name}_format_ok"] = sum(h.startswith("language English<asr_text>") for h in hyps) / len(
                hyps
            )
            res[f"{name}_example"] = [texts[0], hyps[0]]
        res["eval_s"] = round(time.time() - t0, 1)
        self.model.train()
        return res

    def run(self) -> None:
        a = self.a
        texts, kinds, feats = load_shards(a.train_split)
        if not texts:
            raise SystemExit(f"no training shards in {corpus.DATA_DIR}: run python -m training.corpus first")
        n_loaded = len(texts)
        n_shards = len(split_files(a.train_split))
        eval_sets = {
            s: tuple(x[: a.eval_n] for x in load_shards(s, 1)) for s in ("test", "test_unseen", "test_noise")
        }
        eval_sets = {k: v for k, v in eval_sets.items() if v[0]}
        lens = [f.shape[1] for f in feats]
        rng = random.Random(a.seed + self.step)
        it = batches(lens, a.max_frames, rng, a.batch_size)
        stop = {"flag": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
        signal.signal(signal.SIGINT, lambda *_: stop.update(flag=True))
        t_end = time.time() + a.minutes * 60
        next_eval = time.time() + a.eval_every * 60
        next_save = time.time() + a.save_every * 60
        acc: dict[str, float] = {"ce": 0.0, "ctc": 0.0, "n": 0, "ex": 0}
        self.model.train()
        while not stop["flag"] and time.time() < t_end:
            if self.step % 500 == 0 and len(split_files(a.train_split)) > n_shards:
                texts, kinds, feats = load_shards(a.train_split)  # shards written since the start
                n_shards = len(split_files(a.train_split))
                n_loaded = len(texts)
                lens = [f.shape[1] for f in feats]
                it = batches(lens, a.max_frames, rng, a.batch_size)
            b = next(it)
            c0, w0 = time.process_time(), time.time()
            lr = self.lr_at()
            for g in self.opt.param_groups:
                g["lr"] = lr
            loss, _, (ce, ctc) = loss_fn(
                self.model,
                self.heads,
                self.vocab,
                [feats[i].float() for i in b],
                [texts[i] for i in b],
                self.ctc_head,
                a.ctc,
            )
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.cpu_s += time.process_time() - c0
            self.wall_s += time.time() - w0
            self.step += 1
            acc["ce"] += ce
            acc["ctc"] += ctc
            acc["n"] += 1
            acc["ex"] += len(b)
            if self.step % 100 == 0:
                self.log(
                    {
                        "event": "train",
                        "step": self.step,
                        "cpu_h": round(self.cpu_s / 3600, 4),
                        "wall_h": round(self.wall_s / 3600, 4),
                        "ce": round(acc["ce"] / acc["n"], 4),
                        "ctc": round(acc["ctc"] / acc["n"], 4),
                        "lr": round(lr, 6),
                        "gnorm": round(float(gn), 3),
                        "examples_per_batch": round(acc["ex"] / acc["n"], 1),
                        "train_examples": n_loaded,
                        "train_split": a.train_split,
                    }
                )
                acc = {"ce": 0.0, "ctc": 0.0, "n": 0, "ex": 0}
            if time.time() >= next_save:
                self.save()
                next_save = time.time() + a.save_every * 60
            if eval_sets and time.time() >= next_eval:
                self.log(self.evaluate(eval_sets))
                next_eval = time.time() + a.eval_every * 60
        self.save()
        if eval_sets:
            self.log(self.evaluate(eval_sets))
        self.save()
        self.log({"event": "stop", "step": self.step, "cpu_h": round(self.cpu_s / 3600, 4)})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=60, help="wall-clock budget of this run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--planned-cpu-h", type=float, default=12.0, help="cosine schedule length in CPU hours")
    ap.add_argument(
        "--cycle-start-cpu-h",
        type=float,
        default=0.0,
        help="stage CPU hours where this cosine cycle starts (a warm restart; 0: the stage's first cycle)",
    )
    ap.add_argument("--max-frames", type=int, default=5000, help="padded log-mel frames per batch")
    ap.add_argument("--batch-size", type=int, default=16, help="examples per batch (0: --max-frames)")
    ap.add_argument("--ctc", type=float, default=0.3)
    ap.add_argument("--eval-every", type=float, default=20, help="minutes")
    ap.add_argument("--eval-n", type=int, default=100)
    ap.add_argument("--save-every", type=float, default=5, help="minutes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--train-split",
        default="train_easy",
        choices=["train", "train_easy", "train_easy+train"],
        help="acoustic range: easy, full, or both mixed (training/README.md: the curriculum)",
    )
    ap.add_argument(
        "--arch", default="{}", help="JSON overrides of training.model.DEFAULT_ARCH (new state only)"
    )
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    Trainer(a).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
