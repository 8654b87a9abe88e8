#!/usr/bin/env node
// llama.cpp's side of peftlab's GGUF checks and decoding benchmark, through
// node-llama-cpp (prebuilt llama.cpp CPU binaries from the npm registry,
// installed by `make llama-cpp` into .llama-cpp/).
//
//   node tools/llama_bench.mjs --model M.gguf --prompt-ids 1,2,3 [--new 16] [--threads 2]
//                              [--batch 1] [--lora ADAPTER.gguf] [--logits]
//
// Loads the GGUF on the CPU (no GPU layers, F32 KV cache, no flash attention,
// so that an F32 model runs in F32 throughout), evaluates the prompt ids in
// --batch identical sequences decoded together (llama.cpp batches the
// sequences of one context into one llama_decode per step), and greedily
// decodes --new tokens (temperature 0: argmax). Prints JSON lines on stdout:
//   {"kind": "greedy", "lora", "tokens": [...]}      sequence 0's new ids
//   {"kind": "logits", "lora", "logits": [...]}      with --logits: the V next-token
//                                                    logits after the prompt
//   {"kind": "timing", "lora", "batch", "threads", "prompt_tokens", "new_tokens",
//    "prefill_ms", "decode_ms_per_step", "decode_tokens_per_s"}
// decode_tokens_per_s counts the tokens of all sequences: batch / step time.
// The prefill includes sampling the first new token; decode steps feed one
// token per sequence and sample the next. With --lora the whole run is done
// twice in the one process, on the base and then with the adapter applied
// (scale 1); every line carries "lora": null or the adapter's path. Exit
// status 2 on bad flags, 1 when llama.cpp fails (its message on stderr), 3
// when node-llama-cpp is not installed (run `make llama-cpp`). A model written
// "no_vocab" (no tokenizer) makes node-llama-cpp abort: it always initialises
// the tokenizer.
import {existsSync} from "node:fs";
import {dirname, join, resolve} from "node:path";
import {fileURLToPath, pathToFileURL} from "node:url";

function fail(code, msg) {
    process.stderr.write(`llama_bench: ${msg}\n`);
    process.exit(code);
}

function parseArgs(argv) {
    const a = {new: 16, threads: 2, batch: 1, logits: false, lora: null, model: null, promptIds: null};
    for (let i = 0; i < argv.length; ++i) {
        const flag = argv[i];
        const value = () => {
            if (i + 1 >= argv.length) fail(2, `${flag} needs a value`);
            return argv[++i];
        };
        const count = (name, v, min) => {
            if (!/^\d+$/.test(v) || Number(v) < min) fail(2, `${name} '${v}': expected a whole number >= ${min}`);
            return Number(v);
        };
        if (flag === "--model") a.model = value();
        else if (flag === "--prompt-ids") {
            const v = value();
            if (!/^\d+(,\d+)*$/.test(v)) fail(2, `--prompt-ids '${v}': expected comma-separated token ids, e.g. 1,2,3`);
            a.promptIds = v.split(",").map(Number);
        } else if (flag === "--new") a.new = count(flag, value(), 1);
        else if (flag === "--threads") a.threads = count(flag, value(), 1);
        else if (flag === "--batch") a.batch = count(flag, value(), 1);
        else if (flag === "--lora") a.lora = value();
        else if (flag === "--logits") a.logits = true;
        else fail(2, `unknown flag '${flag}' (see the header of tools/llama_bench.mjs)`);
    }
    if (!a.model) fail(2, "--model M.gguf is required");
    if (!existsSync(a.model)) fail(2, `--model '${a.model}': no such file`);
    if (a.lora && !existsSync(a.lora)) fail(2, `--lora '${a.lora}': no such file`);
    if (!a.promptIds) fail(2, "--prompt-ids is required");
    return a;
}

const args = parseArgs(process.argv.slice(2));
const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const pkg = join(process.env.PEFTLAB_LLAMA_CPP_DIR || join(root, ".llama-cpp"), "node_modules/node-llama-cpp/dist/index.js");
if (!existsSync(pkg)) fail(3, `node-llama-cpp is not installed (${pkg}); run \`make llama-cpp\``);
const {getLlama, LlamaLogLevel} = await import(pathToFileURL(pkg).href);

try {
    const llama = await getLlama({gpu: false, build: "never", skipDownload: true, progressLogs: false,
                                  logLevel: LlamaLogLevel.error, maxThreads: args.threads});
    const model = await llama.loadModel({modelPath: resolve(args.model), gpuLayers: 0,
                                         defaultContextFlashAttention: false});
    const P = args.promptIds.length;
    // The base alone, then (with --lora) base + adapter: one process loads llama.cpp once.
    for (const lora of args.lora ? [null, args.lora] : [null]) {
        const context = await model.createContext({
            contextSize: P + args.new + 1,
            sequences: args.batch,
            batchSize: Math.max(P * args.batch, 32),
            threads: {ideal: args.threads, min: args.threads},
            flashAttention: false,
            experimentalKvCacheKeyType: "F32",
            experimentalKvCacheValueType: "F32",
            ...(lora ? {lora: {adapters: [{filePath: resolve(lora), scale: 1}]}} : {}),
        });
        const tag = {lora};
        const seqs = Array.from({length: args.batch}, () => context.getSequence());
        const greedy = {temperature: 0};

        const t0 = performance.now();
        const first = await Promise.all(seqs.map((seq, s) => seq.controlledEvaluate(args.promptIds.map((id, i) =>
            i < P - 1 ? id : [id, {generateNext: {token: true, logits: args.logits && s === 0, options: greedy}}]))));
        const t1 = performance.now();
        const out = seqs.map((_, s) => [first[s][P - 1].next.token]);
        if (args.logits) {
            const map = first[0][P - 1].next.logits;  // Map token -> logit
            const logits = new Array(map.size).fill(null);
            for (const [tok, v] of map) logits[tok] = v;
            process.stdout.write(JSON.stringify({kind: "logits", ...tag, logits}) + "\n");
        }
        for (let step = 1; step < args.new; ++step) {
            const res = await Promise.all(seqs.map((seq, s) => seq.controlledEvaluate(
                [[out[s][step - 1], {generateNext: {token: true, options: greedy}}]])));
            for (let s = 0; s < args.batch; ++s) out[s].push(res[s][0].next.token);
        }
        const t2 = performance.now();
        const steps = args.new - 1;
        process.stdout.write(JSON.stringify({kind: "greedy", ...tag, tokens: out[0]}) + "\n");
        process.stdout.write(JSON.stringify({
            kind: "timing", ...tag, batch: args.batch, threads: args.threads, prompt_tokens: P, new_tokens: args.new,
            prefill_ms: t1 - t0,
            decode_ms_per_step: steps > 0 ? (t2 - t1) / steps : null,
            decode_tokens_per_s: steps > 0 ? 1000 * steps * args.batch / (t2 - t1) : null,
        }) + "\n");
        await context.dispose();
    }
    await model.dispose();
    await llama.dispose();
} catch (e) {
    fail(1, e?.message ?? String(e));
}
