"""Regenerate the embedded demo: corpus, tokenizer and a tiny Qwen3-MoE teacher trained with
our own model code. Deterministic: rerunning rewrites the committed files bit for bit (same
jax version, CPU).

Usage: python scripts/make_tiny_teacher.py [--out moedistill/assets] [--steps 1500]
Writes <out>/corpus/{train,heldout}.jsonl and <out>/tiny_teacher/ (config.json,
model.safetensors, tokenizer files, training.json with these settings and the final loss).
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moedistill.data import corpus
from moedistill.data.packing import pack
from moedistill.hub import hf
from moedistill.model.config import ModelConfig
from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM
from moedistill.training import param_tree as P
from moedistill.training.train_step import labels_and_mask

SETTINGS = dict(
    train_docs=30000, heldout_docs=400, train_seed=1, heldout_seed=2, vocab_size=256,
    seq_len=128, batch_size=32, lr=3e-3, warmup=100, weight_decay=0.01, init_seed=0,
    model=dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, rope_theta=10000.0,
               max_position_embeddings=512))


def write_corpus(out: Path, s):
  out.mkdir(parents=True, exist_ok=True)
  for name, n, seed in (("train", s["train_docs"], s["train_seed"]),
                        ("heldout", s["heldout_docs"], s["heldout_seed"])):
    with open(out / f"{name}.jsonl", "w") as f:
      for d in corpus.documents(n, seed):
        f.write(json.dumps({"text": d}) + "\n")


def train_tokenizer(texts, vocab_size, out: Path):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>", "<pad>", "<unk>"],
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                 unk_token="<unk>")
  fast.save_pretrained(out)
  return fast


def train_teacher(cfg: ModelConfig, tokens, segs, s, steps):
  model = Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(s["init_seed"]))
  graphdef, template, params = P.split(model)
  sched = optax.warmup_cosine_decay_schedule(0.0, s["lr"], s["warmup"], steps, s["lr"] * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(sched, b2=0.98, weight_decay=s["weight_decay"]))
  opt = tx.init(params)

  def loss_fn(params, tok, seg):
    logits, aux = P.merge(graphdef, template, params)(tok, seg)
    labels, mask = labels_and_mask(tok, seg)
    lp = jax.nn.log_softmax(logits.astype(jnp.float32))
    ce = -jnp.take_along_axis(lp, labels[..., None], -1)[..., 0]
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1)

  @jax.jit
  def step(params, opt, tok, seg):
    loss, g = jax.value_and_grad(loss_fn)(params, tok, seg)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss

  rng = np.random.default_rng(0)
  b, losses, t0 = s["batch_size"], [], time.time()
  for i in range(steps):
    idx = rng.integers(0, len(tokens), b)
    params, opt, loss = step(params, opt, tokens[idx], segs[idx])
    losses.append(float(loss))
    if (i + 1) % 100 == 0:
      print(f"step {i + 1}/{steps} loss {np.mean(losses[-100:]):.4f} "
            f"({time.time() - t0:.0f}s)", flush=True)
  return P.merge(graphdef, template, params), float(np.mean(losses[-100:]))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "moedistill"
                                       / "assets"))
  ap.add_argument("--steps", type=int, default=1500)
  a = ap.parse_args()
  s = dict(SETTINGS, steps=a.steps)
  out = Path(a.out)
  write_corpus(out / "corpus", s)
  texts = [json.loads(line)["text"] for line in open(out / "corpus" / "train.jsonl")]
  with tempfile.TemporaryDirectory() as tmp:
    tok = train_tokenizer(texts, s["vocab_size"], Path(tmp))
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    tokens, segs = pack(ids, s["seq_len"], tok.eos_token_id, tok.pad_token_id)
    m = s["model"]
    cfg = ModelConfig(**m, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    print(f"corpus: {len(texts)} docs, {len(tokens)} rows of {s['seq_len']}; vocab {len(tok)}")
    model, final = train_teacher(cfg, tokens, segs, s, a.steps)
    dest = out / "tiny_teacher"
    hf.save_model(model, dest, tokenizer_from=tmp)
  (dest / "training.json").write_text(json.dumps(
      {**s, "final_train_loss": round(final, 4), "jax": jax.__version__,
       "command": "python scripts/make_tiny_teacher.py"}, indent=2))
  print(f"wrote {dest} (final train loss {final:.4f})")


if __name__ == "__main__":
  main()
