/**
 * A model's chat template (the Jinja template in its `tokenizer_config.json`, or the
 * `chat_template.jinja` file beside it) rendered with `@huggingface/jinja`, the JavaScript port
 * of the environment `transformers` renders templates in (`trim_blocks`, `lstrip_blocks`,
 * `raise_exception`), so a conversation becomes the same text `apply_chat_template` gives.
 *
 * The rendered text already holds the model's special tokens (the template writes
 * `bos_token` itself), so it is tokenized without adding special tokens, as `transformers`
 * does.
 *
 * @module
 */

import { Template } from "@huggingface/jinja";
import { join } from "node:path";
import { UsageError } from "./errors.ts";
import { isDirectory, isFile } from "./fs.ts";

/** One turn of a conversation: `role` (system, user, assistant, …) and its text. */
export interface ChatMessage {
  /** Who speaks: `system`, `user`, `assistant` or any role the template knows. */
  role: string;
  /** The turn's text. */
  content: string;
  /** Other fields (e.g. `tool_calls`) are handed to the template as they are. */
  [key: string]: unknown;
}

/** Special-token strings the template sees (`bos_token`, `eos_token`, …); null when unset. */
export interface ChatSpecialTokens {
  /** `bos_token` of tokenizer_config.json. */
  bosToken: string | null;
  /** `eos_token` of tokenizer_config.json. */
  eosToken: string | null;
  /** `unk_token` of tokenizer_config.json. */
  unkToken: string | null;
  /** `pad_token` of tokenizer_config.json. */
  padToken: string | null;
}

/** A parsed chat template with the special-token strings of its model. */
export class ChatTemplate {
  /** Where the template came from (a file path), for messages. */
  readonly source: string;
  /** The template's Jinja text. */
  readonly text: string;
  /** The special-token strings passed to every render. */
  readonly special: ChatSpecialTokens;
  #template: Template;

  /**
   * Parses `text`; a template that does not parse is a one-line UsageError naming `source`.
   */
  constructor(text: string, special: ChatSpecialTokens, source: string) {
    this.source = source;
    this.text = text;
    this.special = special;
    try {
      this.#template = new Template(text);
    } catch (e) {
      throw new UsageError(`${source}: the chat template does not parse: ${messageOf(e)}`);
    }
  }

  /**
   * The text of `messages`, followed by the assistant's header when `addGenerationPrompt`
   * (default false). A template error (e.g. its `raise_exception("Conversation roles must
   * alternate…")`) is a one-line UsageError `chat template: <the template's message>`.
   */
  render(messages: readonly ChatMessage[], opts: { addGenerationPrompt?: boolean } = {}): string {
    const ctx: Record<string, unknown> = {
      messages,
      add_generation_prompt: opts.addGenerationPrompt ?? false,
    };
    const s = this.special;
    // Unset tokens stay undefined (rendered empty), as transformers leaves them out.
    if (s.bosToken !== null) ctx.bos_token = s.bosToken;
    if (s.eosToken !== null) ctx.eos_token = s.eosToken;
    if (s.unkToken !== null) ctx.unk_token = s.unkToken;
    if (s.padToken !== null) ctx.pad_token = s.padToken;
    try {
      return this.#template.render(ctx);
    } catch (e) {
      throw new UsageError(`chat template: ${messageOf(e)}`);
    }
  }
}

function messageOf(e: unknown): string {
  const m = e instanceof Error ? e.message : String(e);
  return m.replace(/\s*\n\s*/g, " ").trim();
}

/** A special token as tokenizer_config.json writes it: a string or an AddedToken object. */
function tokenString(v: unknown, key: string, source: string): string | null {
  if (v === undefined || v === null) return null;
  if (typeof v === "string") return v;
  if (typeof v === "object" && typeof (v as { content?: unknown }).content === "string") {
    return (v as { content: string }).content;
  }
  throw new UsageError(
    `${source}: ${key} = ${
      JSON.stringify(v)
    }: must be a string or an object with a "content" string`,
  );
}

/** The special-token strings of a parsed tokenizer_config.json. */
export function specialTokensOf(
  config: Record<string, unknown>,
  source: string,
): ChatSpecialTokens {
  return {
    bosToken: tokenString(config.bos_token, "bos_token", source),
    eosToken: tokenString(config.eos_token, "eos_token", source),
    unkToken: tokenString(config.unk_token, "unk_token", source),
    padToken: tokenString(config.pad_token, "pad_token", source),
  };
}

/**
 * The template text of a tokenizer_config.json `chat_template` field: a string, or the list of
 * named templates (`[{name, template}]`) of which `default` is used. Null when the field is
 * absent; a malformed field is a one-line UsageError.
 */
export function templateTextOf(config: Record<string, unknown>, source: string): string | null {
  const t = config.chat_template;
  if (t === undefined || t === null) return null;
  if (typeof t === "string") return t;
  if (Array.isArray(t)) {
    const names: string[] = [];
    for (const entry of t) {
      const e = entry as { name?: unknown; template?: unknown } | null;
      if (!e || typeof e !== "object" || typeof e.name !== "string") {
        throw new UsageError(
          `${source}: chat_template list entries must be {"name": string, "template": string}`,
        );
      }
      names.push(e.name);
      if (e.name === "default") {
        if (typeof e.template !== "string") {
          throw new UsageError(`${source}: chat_template "default" has no "template" string`);
        }
        return e.template;
      }
    }
    throw new UsageError(
      `${source}: chat_template lists ${
        names.map((n) => JSON.stringify(n)).join(", ") || "no templates"
      } but no "default"`,
    );
  }
  throw new UsageError(
    `${source}: chat_template must be a string or a list of {"name", "template"}; it is ${typeof t}`,
  );
}

/**
 * The chat template of a model folder (or of the folder holding the given tokenizer.json):
 * `chat_template.jinja` when present (transformers reads it first), else tokenizer_config.json's
 * `chat_template`; the special-token strings come from tokenizer_config.json. A folder without
 * a template is a one-line UsageError saying `messages` data needs one.
 */
export function loadChatTemplate(model: string): ChatTemplate {
  const dir = isDirectory(model) ? model : model.replace(/\/[^/]*$/, "") || ".";
  const configPath = join(dir, "tokenizer_config.json");
  let config: Record<string, unknown> = {};
  if (isFile(configPath)) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(Deno.readTextFileSync(configPath));
    } catch (e) {
      throw new UsageError(`${configPath}: not readable JSON (${messageOf(e)})`);
    }
    if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
      throw new UsageError(`${configPath}: must hold a JSON object`);
    }
    config = parsed as Record<string, unknown>;
  }
  const special = specialTokensOf(config, configPath);
  const sidecar = join(dir, "chat_template.jinja");
  if (isFile(sidecar)) {
    let text: string;
    try {
      text = Deno.readTextFileSync(sidecar);
    } catch (e) {
      throw new UsageError(`${sidecar}: not readable (${messageOf(e)})`);
    }
    return new ChatTemplate(text, special, sidecar);
  }
  const text = templateTextOf(config, configPath);
  if (text === null) {
    throw new UsageError(
      `${model} has no chat template (no chat_template in tokenizer_config.json, no ` +
        `chat_template.jinja), which messages data needs; use prompt/completion or text data`,
    );
  }
  return new ChatTemplate(text, special, configPath);
}
