import assert from "node:assert/strict";
import { join } from "node:path";
import {
  type ChatMessage,
  ChatTemplate,
  loadChatTemplate,
  specialTokensOf,
  templateTextOf,
} from "../lib/chat_template.ts";
import { UsageError } from "../lib/errors.ts";
import { openTokenizer } from "../lib/tokenizer.ts";

// Fixtures made by tools/chat_fixtures.py with transformers' apply_chat_template.
const fixtures = new URL("./fixtures/chat/", import.meta.url).pathname;
const want = JSON.parse(Deno.readTextFileSync(join(fixtures, "expected.json")));
const conversations = want.conversations as Record<string, ChatMessage[]>;

for (const folder of ["llama3", "llama2", "zephyr"]) {
  Deno.test(`${folder} chat template renders and tokenizes as transformers does`, () => {
    const dir = join(fixtures, folder);
    const chat = loadChatTemplate(dir);
    const tok = openTokenizer(dir);
    for (const [name, conv] of Object.entries(conversations)) {
      const w = want.renders[folder][name];
      assert.equal(chat.render(conv), w.text, `${folder}/${name}`);
      assert.equal(
        chat.render(conv, { addGenerationPrompt: true }),
        w.with_generation_prompt,
        `${folder}/${name} with generation prompt`,
      );
      assert.deepEqual([...tok.encode(w.text, { addSpecial: false })], w.ids, `${folder}/${name}`);
    }
  });
}

Deno.test("the template comes from the right place", () => {
  // A string chat_template.
  assert.equal(
    loadChatTemplate(join(fixtures, "llama3")).source.endsWith("tokenizer_config.json"),
    true,
  );
  // The named list: its "default" entry, not the first.
  const l2 = loadChatTemplate(join(fixtures, "llama2"));
  assert.match(l2.text, /<<SYS>>/);
  assert.doesNotMatch(l2.text, /TOOL/);
  // chat_template.jinja wins over tokenizer_config.json's string (a decoy there).
  const z = loadChatTemplate(join(fixtures, "zephyr"));
  assert.equal(z.source, join(fixtures, "zephyr", "chat_template.jinja"));
  // A tokenizer.json path means its folder.
  assert.equal(loadChatTemplate(join(fixtures, "zephyr", "tokenizer.json")).text, z.text);
  // Special tokens: strings and AddedToken objects (llama2's bos_token is an object).
  assert.deepEqual(l2.special, {
    bosToken: "<s>",
    eosToken: "</s>",
    unkToken: "<unk>",
    padToken: null,
  });
  assert.deepEqual(loadChatTemplate(join(fixtures, "llama3")).special, {
    bosToken: "<|begin_of_text|>",
    eosToken: "<|eot_id|>",
    unkToken: null,
    padToken: null,
  });
});

Deno.test("a template's raise_exception is a one-line UsageError with its message", () => {
  const chat = loadChatTemplate(join(fixtures, "llama2"));
  assert.throws(
    () => chat.render([{ role: "user", content: "a" }, { role: "user", content: "b" }]),
    (e: unknown) => {
      assert.ok(e instanceof UsageError);
      assert.equal(e.message, `chat template: ${want.llama2_error}`);
      return true;
    },
  );
});

Deno.test("bad templates and configs are one-line UsageErrors", () => {
  const oneLine = (f: () => unknown, re: RegExp) =>
    assert.throws(f, (e: unknown) => {
      assert.ok(e instanceof UsageError, String(e));
      assert.doesNotMatch(e.message, /\n/);
      assert.match(e.message, re);
      return true;
    });
  oneLine(
    () => new ChatTemplate("{% for x in %}", specialTokensOf({}, "t"), "src.json"),
    /^src\.json: the chat template does not parse/,
  );
  oneLine(
    () => templateTextOf({ chat_template: 3 }, "c.json"),
    /c\.json: chat_template must be a string or a list/,
  );
  oneLine(
    () => templateTextOf({ chat_template: [{ name: "rag", template: "x" }] }, "c.json"),
    /lists "rag" but no "default"/,
  );
  oneLine(
    () => templateTextOf({ chat_template: [{ template: "x" }] }, "c.json"),
    /list entries must be/,
  );
  oneLine(
    () => specialTokensOf({ eos_token: 5 }, "c.json"),
    /c\.json: eos_token = 5: must be a string/,
  );
  assert.equal(templateTextOf({}, "c.json"), null);

  const dir = Deno.makeTempDirSync();
  try {
    // No template at all: the error says messages data needs one.
    Deno.writeTextFileSync(
      join(dir, "tokenizer_config.json"),
      JSON.stringify({ eos_token: "</s>" }),
    );
    oneLine(() => loadChatTemplate(dir), /has no chat template .*which messages data needs/);
    Deno.writeTextFileSync(join(dir, "tokenizer_config.json"), "{not json");
    oneLine(() => loadChatTemplate(dir), /tokenizer_config\.json: not readable JSON/);
    Deno.writeTextFileSync(join(dir, "tokenizer_config.json"), "[1]");
    oneLine(() => loadChatTemplate(dir), /must hold a JSON object/);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});
