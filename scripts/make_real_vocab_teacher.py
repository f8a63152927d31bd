"""A Qwen3-MoE teacher with a real vocabulary: English text from a Debian package, a byte-level
BPE (vocab 16,384 by default) trained with `tokenizers`, and a small MoE trained with our own
model code (as scripts/make_tiny_teacher.py does for the embedded demo) until its validation
perplexity plateaus or a time budget runs out.

  nice -n 19 python scripts/make_real_vocab_teacher.py [--out=runs/real_vocab_teacher]
      [--deb=/path/python3.11-doc_*.deb] [--vocab_size=16384] [--budget_min=25]

Text: the HTML of the CPython documentation in Debian's `python3.11-doc` package (fetched with
`apt-get download python3.11-doc` when --deb is not given; the package name and version are
recorded). Each page's main body is stripped to text (code blocks, navigation and pilcrows
dropped), split into documents of at most --doc_chars characters at paragraph boundaries; pages
are assigned to splits by a hash of their path, so no page is in two splits:
  train.jsonl   the teacher's (and the distillation's) training text
  valid.jsonl   the teacher's early-stopping set (perplexity curve)
  heldout.jsonl the distillation's held-out set (never seen by the teacher either)
Writes <out>/{train,valid,heldout}.jsonl, <out>/teacher/ (HF checkpoint: config.json,
model.safetensors, tokenizer files, training.json), <out>/curve.csv, <out>/README.md, and
<out>/teacher/training.json with the settings, the source package, the perplexity curve and the
teacher's mean top-k mass on held-out text (k = 1, 16, 32, 64, 256).

The learning rate is a warmup then cosine decay over the steps the remaining budget is
expected to allow (re-estimated at each evaluation from the measured step rate, so a loaded
machine shortens the schedule rather than cutting it off mid-decay). Training stops at the
end of the schedule, or earlier when --patience evaluations in a row improve the validation
loss by less than --min_delta (relative).
"""
from __future__ import annotations

import glob
import html.parser
import json
import math
import re
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "python3.11-doc"

F = flags.FLAGS
flags.DEFINE_string("out", str(ROOT / "runs" / "real_vocab_teacher"), "output directory")
flags.DEFINE_string("deb", "", f"path of a {PACKAGE} .deb ('' = apt-get download it)")
flags.DEFINE_integer("vocab_size", 16384, "byte-level BPE vocabulary size")
flags.DEFINE_integer("doc_chars", 2000, "documents are at most this many characters")
flags.DEFINE_integer("valid_pct", 3, "percent of pages in valid.jsonl")
flags.DEFINE_integer("heldout_pct", 3, "percent of pages in heldout.jsonl")
flags.DEFINE_integer("hidden", 128, "hidden size")
flags.DEFINE_integer("layers", 4, "decoder layers")
flags.DEFINE_integer("experts", 8, "experts per MoE layer")
flags.DEFINE_integer("top_k", 2, "experts per token")
flags.DEFINE_integer("moe_inter", 256, "expert intermediate size")
flags.DEFINE_integer("heads", 4, "attention heads")
flags.DEFINE_integer("kv_heads", 2, "key/value heads")
flags.DEFINE_integer("head_dim", 32, "head dimension")
flags.DEFINE_integer("seq_len", 128, "packed row length")
flags.DEFINE_integer("batch", 32, "rows per step")
flags.DEFINE_float("lr", 3e-3, "peak learning rate")
flags.DEFINE_integer("warmup", 100, "warmup steps")
flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay")
flags.DEFINE_float("budget_min", 25.0, "training time budget in minutes (wall clock)")
flags.DEFINE_integer("max_steps", 0, "stop after this many steps (0 = budget only)")
flags.DEFINE_integer("eval_every", 100, "steps between validation evaluations")
flags.DEFINE_integer("eval_rows", 256, "validation rows per evaluation")
flags.DEFINE_integer("patience", 3, "evaluations without min_delta improvement before stopping")
flags.DEFINE_float("min_delta", 0.002, "relative validation-loss improvement that counts")
flags.DEFINE_integer("seed", 0, "init and data order")

SKIP_DIRS = {"_static", "_images", "_sources", "c-api"}
SKIP_PAGES = {"genindex", "search", "py-modindex", "contents", "copyright", "license", "bugs",
              "about", "glossary", "index"}
BLOCK = {"p", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "div", "section",
         "blockquote", "table", "caption", "figcaption"}


class BodyText(html.parser.HTMLParser):
  """The text of <div role="main">: paragraphs separated by blank lines; <pre>, <script>,
  <style> and header links (the pilcrow anchors) dropped."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.depth = 0          # div depth inside the main body (0 = outside)
    self.skip_tag, self.skip_n = None, 0  # inside a dropped element: its tag, its nesting
    self.parts: list[str] = []

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    if self.depth == 0:
      if tag == "div" and a.get("role") == "main":
        self.depth = 1
      return
    if tag == "div":
      self.depth += 1
    if self.skip_tag:
      self.skip_n += tag == self.skip_tag
    elif tag in ("pre", "script", "style") or "headerlink" in (a.get("class") or ""):
      self.skip_tag, self.skip_n = tag, 1
    elif tag in BLOCK or tag == "br":
      self.parts.append("\n\n")

  def handle_endtag(self, tag):
    if self.depth == 0:
      return
    if tag == "div":
      self.depth -= 1
    if self.skip_tag:
      if tag == self.skip_tag:
        self.skip_n -= 1
        if not self.skip_n:
          self.skip_tag = None
    elif tag in BLOCK:
      self.parts.append("\n\n")

  def handle_data(self, data):
    if self.depth and not self.skip_tag:
      self.parts.append(data)


def page_text(path: Path) -> str:
  p = BodyText()
  p.feed(path.read_text(encoding="utf-8", errors="replace"))
  text = "".join(p.parts).replace("\xa0", " ").replace("\u00b6", "")
  paras = [" ".join(x.split()) for x in re.split(r"\n\s*\n", text)]
  return "\n\n".join(x for x in paras if len(x) > 1)


def documents(text: str, max_chars: int) -> list[str]:
  """Consecutive paragraphs joined up to max_chars (a longer paragraph is its own document)."""
  out, cur = [], ""
  for para in text.split("\n\n"):
    if cur and len(cur) + 1 + len(para) > max_chars:
      out.append(cur)
      cur = ""
    cur = f"{cur}\n{para}" if cur else para
  if cur:
    out.append(cur)
  return [d for d in out if len(d) >= 40]


def fetch_deb(work: Path) -> Path:
  subprocess.run(["apt-get", "download", PACKAGE], cwd=work, check=True)
  return Path(sorted(glob.glob(str(work / f"{PACKAGE}_*.deb")))[-1])


def write_corpus(out: Path, work: Path) -> dict:
  deb = Path(F.deb) if F.deb else fetch_deb(work)
  version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True,
                           text=True, check=True).stdout.strip()
  subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "x")], check=True)
  html_root = work / "x" / "usr" / "share" / "doc" / "python3.11" / "html"
  splits = {"train": [], "valid": [], "heldout": []}
  pages = 0
  for path in sorted(html_root.rglob("*.html")):
    rel = path.relative_to(html_root)
    if rel.parts[0] in SKIP_DIRS or path.stem in SKIP_PAGES:
      continue
    docs = documents(page_text(path), F.doc_chars)
    if not docs:
      continue
    pages += 1
    h = zlib.crc32(str(rel).encode()) % 100
    split = ("valid" if h < F.valid_pct else
             "heldout" if h < F.valid_pct + F.heldout_pct else "train")
    splits[split].extend(docs)
  stats = {}
  for name, docs in splits.items():
    with open(out / f"{name}.jsonl", "w") as f:
      for d in docs:
        f.write(json.dumps({"text": d}) + "\n")
    stats[name] = {"docs": len(docs), "chars": sum(map(len, docs))}
  return {"package": PACKAGE, "version": version, "deb": deb.name, "pages": pages,
          "html_root": "/usr/share/doc/python3.11/html", "splits": stats}


def train_tokenizer(texts, vocab_size, out: Path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                 pad_token="<|pad|>")
  fast.save_pretrained(out)
  return fast


def rows(tok, path: Path, seq_len: int):
  from moedistill.data.packing import pack
  texts = [json.loads(x)["text"] for x in open(path)]
  ids = [e.ids for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
  return pack(ids, seq_len, tok.eos_token_id, tok.pad_token_id)


def train_teacher(cfg, train, valid, heldout, log):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from moedistill.model.qwen3_moe import Qwen3MoeForCausalLM
  from moedistill.training import param_tree as P
  from moedistill.training.train_step import labels_and_mask

  model = Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(F.seed))
  graphdef, template, params = P.split(model)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.inject_hyperparams(optax.adamw)(
                       learning_rate=0.0, b2=0.98, weight_decay=F.weight_decay))
  opt = tx.init(params)

  def nll(params, tok, seg):
    logits, _ = P.merge(graphdef, template, params)(tok, seg)
    labels, mask = labels_and_mask(tok, seg)
    lp = jax.nn.log_softmax(logits.astype(jnp.float32))
    ce = -jnp.take_along_axis(lp, labels[..., None], -1)[..., 0]
    return ce, mask, lp

  def loss_fn(params, tok, seg):
    ce, mask, _ = nll(params, tok, seg)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1)

  @jax.jit
  def step(params, opt, tok, seg, lr):
    loss, g = jax.value_and_grad(loss_fn)(params, tok, seg)
    opt[1].hyperparams["learning_rate"] = lr
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss

  ks = (1, 16, 32, 64, 256)

  @jax.jit
  def eval_rows(params, tok, seg):
    ce, mask, lp = nll(params, tok, seg)
    top = jax.lax.top_k(lp, max(ks))[0]
    cum = jnp.cumsum(jnp.exp(top), -1)
    mass = jnp.stack([cum[..., k - 1] for k in ks], -1)
    ent = -jnp.sum(jnp.exp(lp) * lp, -1)
    m = mask.astype(jnp.float32)
    return jnp.sum(ce * m), jnp.sum(m), jnp.sum(mass * m[..., None], (0, 1)), jnp.sum(ent * m)

  def evaluate(params, data, n_rows):
    tok, seg = data
    tot = np.zeros(3 + len(ks))
    for i in range(0, min(n_rows, len(tok)), F.batch):
      ce, n, mass, ent = eval_rows(params, tok[i:i + F.batch], seg[i:i + F.batch])
      tot += np.array([float(ce), float(n), float(ent), *np.asarray(mass)])
    n = tot[1]
    return {"loss": tot[0] / n, "ppl": math.exp(tot[0] / n), "entropy": tot[2] / n,
            "tokens": int(n), "topk_mass": {str(k): tot[3 + i] / n for i, k in enumerate(ks)}}

  def lr_at(i, total):
    if i < F.warmup:
      return F.lr * (i + 1) / F.warmup
    frac = min(1.0, (i - F.warmup) / max(1, total - F.warmup))
    return F.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

  rng = np.random.default_rng(F.seed)
  tokens, segs = train
  budget = F.budget_min * 60
  total = F.max_steps or 10**9
  curve, losses, best, stale = [], [], float("inf"), 0
  t0 = time.time()
  i = 0
  while i < total:
    idx = rng.integers(0, len(tokens), F.batch)
    params, opt, loss = step(params, opt, tokens[idx], segs[idx],
                             jnp.float32(lr_at(i, total)))
    losses.append(float(loss))
    i += 1
    if i == 20:  # after compilation: a first estimate of the steps the budget allows
      t20 = time.time()
    if i > 20 and (i % F.eval_every == 0 or i == total):
      elapsed = time.time() - t0
      rate = (i - 20) / (time.time() - t20)
      if not F.max_steps:  # steps the remaining budget allows at the measured rate
        left = budget - elapsed
        total = i if left <= 0 else max(i + 1, int(i + left * rate * 0.97))
      v = evaluate(params, valid, F.eval_rows)
      curve.append({"step": i, "seconds": round(elapsed, 1), "train_loss": float(
          np.mean(losses[-F.eval_every:])), "valid_loss": v["loss"], "valid_ppl": v["ppl"],
          "lr": lr_at(i, total)})
      log(f"step {i}/{total} train {curve[-1]['train_loss']:.4f} valid {v['loss']:.4f} "
          f"(ppl {v['ppl']:.1f}) top64 mass {v['topk_mass']['64']:.4f} "
          f"[{elapsed:.0f}s, {rate:.2f} steps/s]")
      if v["loss"] < best * (1 - F.min_delta):
        best, stale = v["loss"], 0
      else:
        stale += 1
        if stale >= F.patience:
          log(f"plateau: {F.patience} evaluations without a {F.min_delta:.1%} improvement")
          break
  seconds = time.time() - t0
  model = P.merge(graphdef, template, params)
  final_valid = evaluate(params, valid, len(valid[0]))
  held = evaluate(params, heldout, len(heldout[0]))
  return model, {"params": n_params, "steps": i, "seconds": round(seconds, 1), "curve": curve,
                 "valid": final_valid, "heldout": held}


def main(_):
  import jax

  from moedistill.hub import hf
  from moedistill.model.config import ModelConfig
  out = Path(F.out)
  out.mkdir(parents=True, exist_ok=True)
  log_f = open(out / "log.txt", "a")

  def log(msg):
    print(msg, flush=True)
    log_f.write(msg + "\n")
    log_f.flush()

  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    source = write_corpus(out, tmp)
    log(f"corpus: {json.dumps(source)}")
    texts = [json.loads(x)["text"] for x in open(out / "train.jsonl")]
    tok_dir = tmp / "tok"
    t = time.time()
    tok = train_tokenizer(texts, F.vocab_size, tok_dir)
    log(f"tokenizer: vocab {len(tok)} in {time.time() - t:.0f}s")
    train, valid, heldout = (rows(tok, out / f"{n}.jsonl", F.seq_len)
                             for n in ("train", "valid", "heldout"))
    log(f"rows of {F.seq_len}: train {len(train[0])}, valid {len(valid[0])}, "
        f"heldout {len(heldout[0])}")
    m = dict(vocab_size=len(tok), hidden_size=F.hidden, intermediate_size=2 * F.moe_inter,
             moe_intermediate_size=F.moe_inter, num_hidden_layers=F.layers,
             num_attention_heads=F.heads, num_key_value_heads=F.kv_heads, head_dim=F.head_dim,
             num_experts=F.experts, num_experts_per_tok=F.top_k, norm_topk_prob=True,
             rope_theta=10000.0, max_position_embeddings=max(512, F.seq_len))
    cfg = ModelConfig(**m, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model, res = train_teacher(cfg, train, valid, heldout, log)
    dest = out / "teacher"
    hf.save_model(model, dest, tokenizer_from=tok_dir)
  settings = {k: getattr(F, k) for k in (
      "vocab_size", "doc_chars", "valid_pct", "heldout_pct", "hidden", "layers", "experts",
      "top_k", "moe_inter", "heads", "kv_heads", "head_dim", "seq_len", "batch", "lr", "warmup",
      "weight_decay", "budget_min", "max_steps", "eval_every", "eval_rows", "patience",
      "min_delta", "seed")}
  rows_n = {"train": int(len(train[0])), "valid": int(len(valid[0])),
            "heldout": int(len(heldout[0]))}
  info = {"source": source, "settings": settings, "model": m, "rows": rows_n,
          "tokens_per_row": F.seq_len, "jax": jax.__version__,
          "command": "nice -n 19 python scripts/make_real_vocab_teacher.py", **res}
  (dest / "training.json").write_text(json.dumps(info, indent=2))
  with open(out / "curve.csv", "w") as f:
    f.write("step,seconds,train_loss,valid_loss,valid_ppl,lr\n")
    for c in res["curve"]:
      f.write(f"{c['step']},{c['seconds']},{c['train_loss']:.4f},{c['valid_loss']:.4f},"
              f"{c['valid_ppl']:.2f},{c['lr']:.2e}\n")
  h = res["heldout"]
  (out / "README.md").write_text(
      f"# Real-vocabulary teacher (scripts/make_real_vocab_teacher.py)\n\n"
      f"Text: Debian package `{source['package']}` version {source['version']} "
      f"({source['pages']} HTML pages of {source['html_root']}, stripped to text).\n"
      f"Splits (by page): {json.dumps(source['splits'])}.\n"
      f"Tokenizer: byte-level BPE, vocab {len(tok)} (`tokenizers`).\n"
      f"Model: {json.dumps(m)}; {res['params']:,} parameters.\n"
      f"Trained {res['steps']} steps x {F.batch} rows x {F.seq_len} tokens in "
      f"{res['seconds']:.0f} s.\n"
      f"Held-out: loss {h['loss']:.4f}, perplexity {h['ppl']:.2f}, entropy {h['entropy']:.3f} "
      f"nats, mean top-k mass {json.dumps({k: round(v, 4) for k, v in h['topk_mass'].items()})}"
      f".\nCurve: curve.csv; everything: teacher/training.json.\n")
  log(f"wrote {dest}: heldout ppl {h['ppl']:.2f}, top-64 mass {h['topk_mass']['64']:.4f}, "
      f"top-16 {h['topk_mass']['16']:.4f}")


if __name__ == "__main__":
  app.run(main)
