/**
 * Tokenizing speed and memory.
 *
 * (a) Speed against Hugging Face `tokenizers` in Python (`encode_batch`), side by side on
 *     the same JSONL file, machine and tokenizer (a LLaMA-3-style byte-level BPE trained
 *     here): docs/s and MB/s. Ours is the whole shard build (read, parse JSON, tokenize in
 *     parallel, write); Python's is `encode_batch` alone on documents already in memory.
 *     Python is `/work/pyref/bin/python`, else `python3`, when `tokenizers` imports;
 *     otherwise that column is skipped with a note.
 * (b) Peak memory while building shards from a generated JSONL corpus of `--gb` GB and then
 *     drawing training windows from them (VmHWM, RssAnon, RssFile from /proc/self/status).
 *
 *   deno run -A bench/tokenize.ts [--mb 50] [--gb 1] [--vocab 8192] [--rounds 2]
 *     [--text FILE] [--skip-rss]
 *
 * Temporary files live under a fresh temp folder, removed at the end.
 * @module
 */
import { parseArgs } from "node:util";
import { join } from "node:path";
import { openCorpus } from "../lib/data.ts";
import { Rng } from "../lib/rng.ts";
import { trainTokenizer } from "../lib/tokenizer.ts";

const { values: args } = parseArgs({
  args: Deno.args,
  options: {
    mb: { type: "string", default: "50" },
    gb: { type: "string", default: "1" },
    vocab: { type: "string", default: "8192" },
    text: {
      type: "string",
      default: new URL("../../shared/data/tinyshakespeare.txt", import.meta.url).pathname,
    },
    rounds: { type: "string", default: "2" },
    "skip-rss": { type: "boolean", default: false },
  },
});
const enc = new TextEncoder();
const rounds = Number(args.rounds);

function status(): Record<string, number> {
  const out: Record<string, number> = {};
  for (const line of Deno.readTextFileSync("/proc/self/status").split("\n")) {
    const m = line.match(/^(VmHWM|VmRSS|RssAnon|RssFile):\s+(\d+) kB/);
    if (m) out[m[1]] = Number(m[2]) * 1024;
  }
  return out;
}

function resetPeak(): void {
  try {
    Deno.writeTextFileSync("/proc/self/clear_refs", "5"); // resets VmHWM to the current RSS
  } catch {
    // not Linux, or not allowed: the peak then counts from the start
  }
}

const gb = (n: number) => `${(n / 2 ** 30).toFixed(2)} GiB`;
const mib = (n: number) => `${(n / 2 ** 20).toFixed(0)} MiB`;

/** Paragraphs of the text (or generated words when the file is missing). */
function paragraphs(): string[] {
  try {
    return Deno.readTextFileSync(args.text).split("\n\n").filter((p) => p.length > 0);
  } catch {
    console.log(`(${args.text} not found: using generated words)`);
    const rng = new Rng(1);
    const syl = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "ba", "do", "fi"];
    return Array.from(
      { length: 20000 },
      () => Array.from({ length: 40 }, () => syl[rng.int(12)] + syl[rng.int(12)]).join(" ") + ".",
    );
  }
}

/** Writes JSONL of the paragraphs, rotated each round, until `bytes` are written. */
function writeJsonl(path: string, paras: string[], bytes: number): number {
  const f = Deno.openSync(path, { write: true, create: true, truncate: true });
  let written = 0, docs = 0, round = 0;
  while (written < bytes) {
    const shift = (round++ * 7919) % paras.length;
    let chunk = "";
    for (let i = 0; i < paras.length && written + chunk.length < bytes; i++) {
      chunk += JSON.stringify({ text: paras[(i + shift) % paras.length] }) + "\n";
      docs++;
    }
    const b = enc.encode(chunk);
    f.writeSync(b);
    written += b.length;
  }
  f.close();
  return docs;
}

function python(): string | null {
  for (const exe of ["/work/pyref/bin/python", "python3"]) {
    try {
      const r = new Deno.Command(exe, { args: ["-c", "import tokenizers"], stderr: "null" })
        .outputSync();
      if (r.success) return exe;
    } catch {
      // not installed
    }
  }
  return null;
}

const PY = `
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
docs = [json.loads(l)["text"] for l in open(sys.argv[2], encoding="utf-8")]
t = time.perf_counter()
out = tok.encode_batch(docs)
s = time.perf_counter() - t
import tokenizers
print(json.dumps({"seconds": s, "docs": len(docs), "tokens": sum(len(e.ids) for e in out),
  "version": tokenizers.__version__}))
`;

const root = Deno.makeTempDirSync({ prefix: "qg-bench-tok-" });
try {
  const cpu = new TextDecoder().decode(new Deno.Command("lscpu").outputSync().stdout)
    .match(/Model name:\s*(.+)/)?.[1] ?? "unknown CPU";
  console.log(`CPU: ${cpu}, ${navigator.hardwareConcurrency} threads`);
  const paras = paragraphs();
  const seed = join(root, "seed.txt");
  Deno.writeTextFileSync(seed, paras.join("\n\n"));
  const tokDir = join(root, "tok");
  let t0 = performance.now();
  const tok = await trainTokenizer({ inputs: [seed], vocabSize: Number(args.vocab), out: tokDir });
  console.log(
    `trained a byte-level BPE of ${tok.vocabSize} ids in ${
      ((performance.now() - t0) / 1e3).toFixed(1)
    } s`,
  );

  // (a) speed, side by side
  const mbBytes = Number(args.mb) * 1e6;
  const speedFile = join(root, "speed.jsonl");
  const nDocs = writeJsonl(speedFile, paras, mbBytes);
  const fileBytes = Deno.statSync(speedFile).size;
  const textBytes = paras.reduce((a, p) => a + enc.encode(p).length, 0) * (nDocs / paras.length);
  console.log(
    `\n(a) ${nDocs} documents, ${(fileBytes / 1e6).toFixed(1)} MB of JSONL ` +
      `(${(textBytes / 1e6).toFixed(1)} MB of text); best of ${rounds} alternating rounds`,
  );
  const py = python();
  let ours = Infinity, ourTokens = 0;
  let theirs: { seconds: number; tokens: number; version: string } | null = null;
  let pyNote = py === null ? "python `tokenizers` column skipped: no Python with `tokenizers`" : "";
  for (let round = 0; round < rounds; round++) {
    t0 = performance.now();
    const ds = await openCorpus({
      data: speedFile,
      tokenizer: tok,
      valFraction: 0.01,
      seqLen: 64,
      cacheDir: join(root, `cache-speed-${round}`),
      progress: false,
    });
    ours = Math.min(ours, (performance.now() - t0) / 1e3);
    ourTokens = ds.info.train_tokens + ds.info.val_tokens;
    ds[Symbol.dispose]();
    if (py === null) continue;
    const r = new Deno.Command(py, {
      args: ["-c", PY, join(tokDir, "tokenizer.json"), speedFile],
      env: { TOKENIZERS_PARALLELISM: "true" },
    }).outputSync();
    if (!r.success) {
      pyNote = `python column failed: ${
        new TextDecoder().decode(r.stderr).trim().split("\n").pop()
      }`;
      continue;
    }
    const p = JSON.parse(new TextDecoder().decode(r.stdout));
    if (theirs === null || p.seconds < theirs.seconds) theirs = p;
  }
  const row = (name: string, s: number, note: string) =>
    console.log(
      `${name.padEnd(36)} ${(nDocs / s).toFixed(0).padStart(9)} docs/s ${
        (textBytes / 1e6 / s).toFixed(2).padStart(7)
      } MB/s (text)  ${s.toFixed(2)} s  ${note}`,
    );
  row("qgalore shard build (all stages)", ours, `${ourTokens} tokens (BOS+EOS per doc)`);
  if (theirs !== null) {
    row(
      `python tokenizers ${theirs.version} encode_batch`,
      theirs.seconds,
      `${theirs.tokens} tokens (BOS per doc)`,
    );
    if (theirs.tokens + nDocs !== ourTokens) console.log("WARNING: token counts differ");
  }
  if (pyNote) console.log(pyNote);
  Deno.removeSync(speedFile);

  // (b) memory on a large corpus
  if (!args["skip-rss"]) {
    const big = join(root, "big.jsonl");
    const want = Number(args.gb) * 2 ** 30;
    t0 = performance.now();
    const bigDocs = writeJsonl(big, paras, want);
    const size = Deno.statSync(big).size;
    console.log(
      `\n(b) generated ${gb(size)} of JSONL (${bigDocs} documents) in ${
        ((performance.now() - t0) / 1e3).toFixed(0)
      } s`,
    );
    resetPeak();
    const before = status();
    t0 = performance.now();
    const corpus = await openCorpus({
      data: big,
      tokenizer: tok,
      valFraction: 0.001,
      seqLen: 1024,
      cacheDir: join(root, "cache-big"),
      progress: true,
    });
    const build = (performance.now() - t0) / 1e3;
    const afterBuild = status();
    console.log(
      `build: ${build.toFixed(0)} s, ${(size / 2 ** 30 / build).toFixed(3)} GiB/s of input; ` +
        `peak RSS ${mib(afterBuild.VmHWM)} (before: RSS ${mib(before.VmRSS)}), ` +
        `RssAnon now ${mib(afterBuild.RssAnon)}; ${corpus.info.train_tokens} train tokens ` +
        `(${corpus.info.dtype})`,
    );
    resetPeak();
    const rng = new Rng(1);
    const steps = 300, batch = 16;
    t0 = performance.now();
    let copied = 0;
    for (let i = 0; i < steps; i++) copied += corpus.trainBatch(rng, batch, 1024, 1).byteLength;
    const draw = (performance.now() - t0) / 1e3;
    const afterDraw = status();
    console.log(
      `windows: ${steps} batches of ${batch}×1025 in ${draw.toFixed(2)} s, ` +
        `${(copied / 2 ** 30 / draw).toFixed(2)} GiB/s of int32 ids; peak RSS ` +
        `${mib(afterDraw.VmHWM)} (RssAnon ${mib(afterDraw.RssAnon)}, RssFile ` +
        `${mib(afterDraw.RssFile)}: mapped shard pages, reclaimable)`,
    );
    corpus[Symbol.dispose]();
  }
} finally {
  Deno.removeSync(root, { recursive: true });
}
