/**
 * Generation benchmark (issue 9): llama-60m with random weights on the CPU, a 32-token prompt
 * and 128 new tokens, greedy, with and without the key/value cache. Prints one JSON line per
 * case: prefill seconds, decode tokens/s (new tokens after the first, which the prefill
 * yields) and overall new tokens/s, plus the seconds spent reading the weights.
 *
 *   deno run -A bench/generate.ts [--vocab 256,32000] [--threads 2] [--new 128] [--prompt 32]
 * @module
 */
import { parseArgs } from "node:util";
import { Engine } from "../ffi/engine.ts";
import { generateIds } from "../lib/generate.ts";
import { benchConfig } from "./common.ts";

const { values } = parseArgs({
  options: {
    model: { type: "string", default: "llama-60m" },
    vocab: { type: "string", default: "256,32000" },
    optimizer: { type: "string", default: "adamw" },
    threads: { type: "string", default: "2" },
    prompt: { type: "string", default: "32" },
    new: { type: "string", default: "128" },
  },
});

function cpuModel(): string {
  try {
    const out = new Deno.Command("lscpu", { stdout: "piped", stderr: "null" }).outputSync();
    const line = new TextDecoder().decode(out.stdout).split("\n").find((l) =>
      l.startsWith("Model name:")
    );
    return line?.replace("Model name:", "").trim() ?? "unknown";
  } catch {
    return "unknown";
  }
}

const [promptLen, maxNew, threads] = [values.prompt, values.new, values.threads].map(Number);
console.log(JSON.stringify({ cpu: cpuModel(), cores: navigator.hardwareConcurrency, threads }));
for (const vocab of values.vocab.split(",").map(Number)) {
  const cfg = benchConfig({
    model: values.model,
    vocab,
    optimizer: values.optimizer,
    rank: 128,
    batchSize: 1,
    seqLen: promptLen,
    device: "cpu",
  });
  using e = await Engine.create({ ...cfg, threads });
  const prompt = Array.from({ length: promptLen }, (_, i) => (i * 7919 + 13) % vocab);
  await generateIds(e, prompt, { maxNewTokens: 4 }); // warm-up
  for (const cache of [true, false]) {
    const r = await generateIds(e, prompt, { maxNewTokens: maxNew, cache });
    const decode = r.seconds - r.prefill_seconds;
    console.log(JSON.stringify({
      model: values.model,
      vocab,
      params: e.params,
      optimizer: e.optimizer,
      cache,
      prompt: promptLen,
      new_tokens: r.ids.length,
      prefill_s: +r.prefill_seconds.toFixed(4),
      decode_tokens_per_s: +((r.ids.length - 1) / decode).toFixed(2),
      tokens_per_s: +(r.ids.length / r.seconds).toFixed(2),
      load_s: +r.load_seconds.toFixed(4),
    }));
  }
}
