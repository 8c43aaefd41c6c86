// The Unmask playground: one request at a time, streamed with `stream_blocks`, drawn step by step.
//
// Data flow: fetch() POSTs to /v1/(chat/)completions with stream + stream_blocks; the SSE body is
// parsed by hand (EventSource cannot POST). Each chunk becomes a "frame" (finalized-text delta,
// current block, figures as of its arrival); frames are drawn no faster than the chosen pace so
// that fast steps stay visible, while the figures always use real arrival times.
"use strict";

(() => {
  const KEY_STORAGE = "unmask.playground.apiKey";
  const PLACEHOLDER = "\u2591"; // the server names its placeholder in each block; this is only the fallback
  const FIXED_STEP_POLICIES = new Set(["low_confidence", "random"]);

  const $ = (id) => document.getElementById(id);
  const el = {
    modelLine: $("model-line"),
    keyForm: $("key-form"), key: $("api-key"), keyState: $("key-state"),
    form: $("gen-form"), prompt: $("prompt"), promptLabel: $("prompt-label"), examples: $("examples"),
    generate: $("generate"), stop: $("stop"), clearChat: $("clear-chat"), conversation: $("conversation"),
    cache: $("cache"), unmask: $("unmask"), blockLength: $("block_length"), steps: $("steps"),
    threshold: $("threshold"), factor: $("factor"), maxTokens: $("max_tokens"),
    temperature: $("temperature"), seed: $("seed"), pace: $("pace"),
    methodBox: $("method-box"), methodGrid: $("method-grid"),
    error: $("error"), status: $("status"), final: $("final-text"), block: $("block"), blockCaption: $("block-caption"),
    figSteps: $("fig-steps"), figTps: $("fig-tps"), figRate: $("fig-rate"), figPolicy: $("fig-policy"),
  };

  const app = {
    config: { model: "", api_key_required: false, defaults: {}, method_fields: [] },
    methodInputs: [], // {field, input, row}: one per method-specific parameter
    apiKey: sessionStorage.getItem(KEY_STORAGE) || "", // tab-scoped: never localStorage, never a cookie
    run: null, // the request in flight (see Run)
    history: [], // chat messages of the conversation so far
  };

  // --- start-up ---------------------------------------------------------------------------------

  async function init() {
    bindEvents();
    onModeChange();
    el.key.value = app.apiKey;
    try {
      const [config, schema] = await Promise.all([getJSON("/playground/config.json"), getJSON("/openapi.json")]);
      app.config = config;
      fillPolicies(el.cache, allowedValues(schema, "cache"), config.defaults.cache);
      fillPolicies(el.unmask, allowedValues(schema, "unmask"), config.defaults.unmask);
      buildMethodFields(schema, config.method_fields || []);
      buildExamples(config.examples || []);
      el.blockLength.placeholder = `default ${config.defaults.block_length}`;
      el.steps.placeholder = config.defaults.steps == null ? "default: 1 token/step" : `default ${config.defaults.steps}`;
      el.threshold.placeholder = `default ${config.defaults.threshold}`;
      el.factor.placeholder = `default ${config.defaults.factor}`;
      el.modelLine.textContent = `Model ${config.model} \u00b7 server defaults: cache ${config.defaults.cache}, ` +
        `unmask ${config.defaults.unmask}, block length ${config.defaults.block_length}`;
      if (config.api_key_required) showKeyForm(app.apiKey ? "" : "Enter the server's API key to generate.");
    } catch (err) {
      showError(`Could not read the server's configuration: ${err.message}`);
    }
  }

  async function getJSON(url) {
    const res = await fetch(url, { headers: { Accept: "application/json" } });
    if (!res.ok) throw new Error(`${url} answered ${res.status}`);
    return res.json();
  }

  /** The enum a request field accepts, as the server's OpenAPI schema states it. */
  function allowedValues(schema, field) {
    const schemas = (schema.components && schema.components.schemas) || {};
    const prop = ((schemas.CompletionRequest || {}).properties || {})[field];
    const found = [];
    const visit = (node) => {
      if (!node || typeof node !== "object") return;
      if (node.$ref) visit(schemas[node.$ref.split("/").pop()]);
      if (Array.isArray(node.enum)) found.push(...node.enum.filter((v) => typeof v === "string"));
      for (const key of ["anyOf", "oneOf", "allOf"]) (node[key] || []).forEach(visit);
    };
    visit(prop);
    return [...new Set(found)];
  }

  /** One labelled input per method-specific parameter, shown only while its method is selected. */
  function buildMethodFields(schema, fields) {
    const props = (((schema.components || {}).schemas || {}).CompletionRequest || {}).properties || {};
    app.methodInputs = fields.map((field) => {
      const id = `mf-${field.name}`;
      const label = document.createElement("label");
      label.htmlFor = id;
      label.textContent = field.name;
      const input = document.createElement("input");
      input.id = id;
      input.type = "number";
      input.min = "0";
      input.step = Number.isInteger(field.default) ? "1" : "0.01";
      input.placeholder = field.default == null ? "default" : `default ${field.default}`;
      const hint = document.createElement("p");
      hint.className = "hint span";
      hint.id = `${id}-hint`;
      hint.textContent = (props[field.name] && props[field.name].description) || `For ${field.kind} = ${field.methods.join(" / ")}.`;
      input.setAttribute("aria-describedby", hint.id);
      el.methodGrid.append(label, input, hint);
      return { field, input, parts: [label, input, hint] };
    });
    showMethodFields();
  }

  // One button per example prompt: a click starts a new chat with it and generates.
  function buildExamples(examples) {
    for (const example of examples) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "example";
      button.dataset.family = example.family;
      button.textContent = `${example.family}: ${example.label}`;
      button.title = example.prompt;
      button.addEventListener("click", () => askExample(example.prompt));
      el.examples.append(button);
    }
    el.examples.hidden = examples.length === 0;
  }

  function askExample(prompt) {
    if (app.run) stopRun();
    el.form.elements.mode.value = "chat";
    app.history = [];
    renderConversation();
    el.prompt.value = prompt;
    el.form.requestSubmit();
  }

  function showMethodFields() {
    const d = app.config.defaults;
    const chosen = { cache: el.cache.value || d.cache, unmask: el.unmask.value || d.unmask };
    let any = false;
    for (const item of app.methodInputs) {
      const active = item.field.methods.includes(chosen[item.field.kind]);
      item.parts.forEach((part) => { part.hidden = !active; });
      item.input.disabled = !active;
      any = any || active;
    }
    el.methodBox.hidden = !any;
  }

  function fillPolicies(select, values, fallback) {
    select.replaceChildren(new Option(`server default (${fallback})`, ""));
    for (const value of values) select.append(new Option(value, value));
  }

  function bindEvents() {
    el.form.addEventListener("submit", (event) => {
      event.preventDefault();
      generate();
    });
    el.prompt.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        el.form.requestSubmit();
      }
    });
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && app.run) stopRun();
    });
    el.stop.addEventListener("click", stopRun);
    el.cache.addEventListener("change", showMethodFields);
    el.unmask.addEventListener("change", showMethodFields);
    el.clearChat.addEventListener("click", () => {
      app.history = [];
      renderConversation();
      el.prompt.focus();
    });
    for (const radio of el.form.elements.mode) radio.addEventListener("change", onModeChange);
    el.key.addEventListener("input", () => setKey(el.key.value));
    el.keyForm.addEventListener("submit", (event) => {
      event.preventDefault();
      setKey(el.key.value);
      checkKey();
    });
  }

  function mode() {
    return el.form.elements.mode.value;
  }

  function onModeChange() {
    const chat = mode() === "chat";
    el.promptLabel.textContent = chat ? "Message" : "Prompt";
    el.conversation.hidden = !chat || app.history.length === 0;
    el.clearChat.hidden = !chat;
  }

  // --- API key ----------------------------------------------------------------------------------

  function setKey(key) {
    app.apiKey = key.trim();
    if (app.apiKey) sessionStorage.setItem(KEY_STORAGE, app.apiKey);
    else sessionStorage.removeItem(KEY_STORAGE);
  }

  function showKeyForm(message) {
    el.keyForm.hidden = false;
    el.keyState.textContent = message;
  }

  async function checkKey() {
    const res = await fetch("/v1/models", { headers: authHeaders() });
    el.keyState.textContent = res.ok ? "Key accepted." : "The server rejected this key.";
  }

  function authHeaders() {
    return app.apiKey ? { Authorization: `Bearer ${app.apiKey}` } : {};
  }

  // --- the request ------------------------------------------------------------------------------

  function optionalNumber(input) {
    return input.value === "" || Number.isNaN(input.valueAsNumber) ? undefined : input.valueAsNumber;
  }

  /** The request body, with the diffusion fields left out where the server default should apply. */
  function requestBody(text) {
    const body = {
      stream: true,
      stream_blocks: true,
      stream_options: { include_usage: true },
      temperature: optionalNumber(el.temperature),
      seed: optionalNumber(el.seed),
      cache: el.cache.value || undefined,
      unmask: el.unmask.value || undefined,
      block_length: optionalNumber(el.blockLength),
      steps: optionalNumber(el.steps),
      threshold: optionalNumber(el.threshold),
      factor: optionalNumber(el.factor),
    };
    for (const item of app.methodInputs) {
      if (!item.input.disabled) body[item.field.name] = optionalNumber(item.input);
    }
    const maxTokens = optionalNumber(el.maxTokens);
    if (mode() === "chat") {
      body.messages = [...app.history, { role: "user", content: text }];
      body.max_completion_tokens = maxTokens;
    } else {
      body.prompt = text;
      body.max_tokens = maxTokens;
    }
    return body;
  }

  /** What the server will use for this request: the request's value, else the server default. */
  function effective(body) {
    const d = app.config.defaults;
    const pick = (value, fallback) => (value === undefined ? fallback : value);
    return {
      cache: pick(body.cache, d.cache),
      unmask: pick(body.unmask, d.unmask),
      blockLength: pick(body.block_length, d.block_length),
      steps: pick(body.steps, d.steps),
      threshold: pick(body.threshold, d.threshold),
      factor: pick(body.factor, d.factor),
      maxTokens: pick(body.max_tokens, body.max_completion_tokens),
    };
  }

  function policyLabel(p) {
    let detail = "";
    if (p.unmask === "threshold") detail = ` (\u03c4 = ${p.threshold})`;
    else if (p.unmask === "factor") detail = ` (f = ${p.factor})`;
    else if (FIXED_STEP_POLICIES.has(p.unmask)) {
      detail = p.steps == null ? " (1 token/step)" : ` (${p.steps} steps/block)`;
    }
    return `cache ${p.cache} \u00b7 unmask ${p.unmask}${detail}`;
  }

  async function generate() {
    if (app.run) return;
    if (!el.form.reportValidity()) return;
    const text = el.prompt.value;
    if (!text.trim()) {
      showError(mode() === "chat" ? "Type a message first." : "Type a prompt first.");
      el.prompt.focus();
      return;
    }
    if (app.config.api_key_required && !app.apiKey) {
      showKeyForm("Enter the server's API key to generate.");
      el.key.focus();
      return;
    }
    const body = requestBody(text);
    const run = new Run(body, effective(body));
    app.run = run;
    resetOutput(run);
    setRunning(true);
    const url = mode() === "chat" ? "/v1/chat/completions" : "/v1/completions";
    try {
      const res = await fetch(url, {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
        body: JSON.stringify(body),
        signal: run.controller.signal,
      });
      if (!res.ok) {
        await failResponse(res);
        run.end("error");
        return;
      }
      for await (const data of sseData(res.body)) {
        if (data === "[DONE]") break;
        run.receive(JSON.parse(data));
      }
      run.end(run.failed ? "error" : "done");
    } catch (err) {
      if (err.name === "AbortError") run.end("stopped");
      else {
        showError(`The request failed: ${err.message}`);
        run.end("error");
      }
    }
  }

  async function failResponse(res) {
    let message = `The server answered ${res.status}.`;
    try {
      const payload = await res.json();
      if (payload.error && payload.error.message) {
        message = payload.error.message + (payload.error.param ? ` (field: ${payload.error.param})` : "");
      }
    } catch (_) { /* not JSON: keep the status line */ }
    showError(message);
    if (res.status === 401) {
      showKeyForm("The server needs a valid API key.");
      el.key.focus();
    }
  }

  /** The `data:` payloads of an SSE body, in order (comments and other fields are ignored). */
  async function* sseData(stream) {
    const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const lines = event.split(/\r?\n/).filter((line) => line.startsWith("data:"));
        if (lines.length) yield lines.map((line) => line.slice(5).replace(/^ /, "")).join("\n");
      }
    }
  }

  function stopRun() {
    if (app.run) app.run.controller.abort();
  }

  // --- one request's state and figures ------------------------------------------------------------

  class Run {
    constructor(body, policy) {
      this.body = body;
      this.policy = policy;
      this.controller = new AbortController();
      this.started = performance.now();
      this.blockSteps = new Map(); // block index -> steps taken in it
      this.blockMasked = new Map(); // block index -> tokens still masked
      this.finalText = "";
      this.finishReason = null;
      this.usage = null;
      this.failed = false;
      this.ended = false;
      this.outcome = null;
      this.frames = [];
      this.timer = null;
      this.lastDrawn = 0;
      this.prevBlock = null;
    }

    /** Tokens in block `index`: blocks are block_length long, the last one cut by max tokens. */
    blockSize(index) {
      const length = this.policy.blockLength;
      if (!this.policy.maxTokens) return length;
      return Math.max(0, Math.min(length, this.policy.maxTokens - index * length));
    }

    figures() {
      let passes = 0;
      for (const steps of this.blockSteps.values()) passes += steps;
      let committed = 0;
      const last = Math.max(-1, ...this.blockSteps.keys());
      for (let b = 0; b <= last; b++) {
        // A block we never saw a view of (possible if chunks coalesce) was already complete.
        committed += this.blockSize(b) - (this.blockMasked.get(b) || 0);
      }
      const seconds = (performance.now() - this.started) / 1000;
      return { passes, committed, seconds, perStep: passes ? committed / passes : 0, perSecond: seconds ? committed / seconds : 0 };
    }

    receive(chunk) {
      if (chunk.error) {
        this.failed = true;
        showError(chunk.error.message || "The engine failed on this request.");
        return;
      }
      if (chunk.usage) this.usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        if (choice.index !== 0) continue;
        const delta = choice.text !== undefined ? choice.text : (choice.delta && choice.delta.content) || "";
        const block = choice.block || null;
        if (block) {
          this.blockSteps.set(block.index, Math.max(block.step, this.blockSteps.get(block.index) || 0));
          this.blockMasked.set(block.index, block.num_masked);
        }
        if (choice.finish_reason) this.finishReason = choice.finish_reason;
        if (delta || block || choice.finish_reason) this.enqueue({ delta, block, figures: this.figures() });
      }
    }

    // Frames are drawn in order, at most one per `pace` milliseconds.
    enqueue(frame) {
      this.frames.push(frame);
      this.schedule();
    }

    schedule() {
      if (this.timer !== null || !this.frames.length) return;
      const pace = Math.max(0, optionalNumber(el.pace) || 0);
      const wait = Math.max(0, this.lastDrawn + pace - performance.now());
      this.timer = setTimeout(() => this.tick(), wait);
    }

    tick() {
      this.timer = null;
      const frame = this.frames.shift();
      if (frame) {
        drawFrame(this, frame);
        this.lastDrawn = performance.now();
      }
      if (this.frames.length) this.schedule();
      else if (this.ended) this.finish();
    }

    end(outcome) {
      this.ended = true;
      this.outcome = outcome;
      this.endFigures = this.figures();
      if (outcome !== "done") this.frames.length = 0; // stopped or failed: show what has been drawn
      if (this.timer === null && !this.frames.length) this.finish();
    }

    finish() {
      if (app.run !== this) return;
      app.run = null;
      setRunning(false);
      drawFigures(this.endFigures, this.policy);
      if (this.outcome === "done") {
        const tokens = this.usage ? this.usage.completion_tokens : this.endFigures.committed;
        setStatus("done", `Done: ${tokens} tokens in ${this.endFigures.seconds.toFixed(2)} s` +
          ` (finish reason: ${this.finishReason || "unknown"}).`);
        if (app.config.api_key_required) el.keyState.textContent = "Key accepted.";
        if (this.body.messages) {
          app.history = [...this.body.messages, { role: "assistant", content: this.finalText }];
          renderConversation();
          el.prompt.value = "";
        }
      } else if (this.outcome === "stopped") {
        setStatus("stopped", "Stopped.");
      } else {
        setStatus("error", "Failed.");
      }
    }
  }

  // --- drawing ------------------------------------------------------------------------------------

  function resetOutput(run) {
    el.error.hidden = true;
    el.error.textContent = "";
    el.final.replaceChildren();
    el.block.replaceChildren();
    el.blockCaption.textContent = "";
    drawFigures(run.figures(), run.policy);
    setStatus("running", "Generating\u2026");
  }

  function setRunning(running) {
    el.generate.disabled = running;
    el.stop.disabled = !running;
    el.form.setAttribute("aria-busy", String(running));
  }

  function setStatus(state, text) {
    el.status.dataset.state = state;
    el.status.textContent = text;
  }

  function showError(message) {
    el.error.textContent = message;
    el.error.hidden = false;
  }

  function drawFigures(f, policy) {
    el.figSteps.textContent = String(f.passes);
    el.figTps.textContent = f.passes ? f.perStep.toFixed(2) : "\u2013";
    el.figRate.textContent = f.passes ? f.perSecond.toFixed(1) : "\u2013";
    el.figPolicy.textContent = policyLabel(policy);
  }

  function drawFrame(run, frame) {
    if (frame.delta) {
      run.finalText += frame.delta;
      el.final.append(document.createTextNode(frame.delta)); // appended, so a screen reader hears only the new text
    }
    if (frame.block) drawBlock(run, frame.block);
    drawFigures(frame.figures, run.policy);
  }

  function drawBlock(run, block) {
    const ph = block.placeholder || PLACEHOLDER;
    const prev = run.prevBlock && run.prevBlock.index === block.index ? run.prevBlock.text : null;
    const segments = (prev !== null && alignBlock(prev, block.text, ph)) || firstView(block.text, ph, prev === null);
    const parts = [];
    for (const seg of segments) {
      if (seg.kind === "mask") {
        const chip = document.createElement("span");
        chip.className = "mask";
        chip.setAttribute("aria-hidden", "true");
        chip.textContent = ph;
        parts.push(chip);
      } else if (seg.kind === "fresh") {
        const span = document.createElement("span");
        span.className = "fresh";
        span.textContent = seg.text;
        parts.push(span);
      } else {
        parts.push(document.createTextNode(seg.text));
      }
    }
    el.block.replaceChildren(...parts);
    const size = run.blockSize(block.index);
    el.blockCaption.textContent = `\u2014 block ${block.index}, step ${block.step}, ` +
      `${block.num_masked} of ${size} masked`;
    run.prevBlock = { index: block.index, text: block.text };
  }

  /** A block seen for the first time: everything committed is new (unless alignment failed). */
  function firstView(text, ph, fresh) {
    const out = [];
    let run = "";
    const flush = () => {
      if (run) out.push({ kind: fresh ? "fresh" : "text", text: run });
      run = "";
    };
    for (const ch of Array.from(text)) {
      if (ch === ph) {
        flush();
        out.push({ kind: "mask" });
      } else run += ch;
    }
    flush();
    return out;
  }

  /**
   * Align a block's previous text with its new text to find what this step committed.
   *
   * The server sends text, not tokens, so token boundaries are recovered here: committed text never
   * changes, and each placeholder of `prev` became either a placeholder again or a token's text
   * (placeholder-free, possibly empty). ok[i][j] says whether prev[i:] can produce next[j:]; the
   * table is O(|prev| * |next|), a few thousand cells for a 32-token block. Returns segments, or
   * null if the texts cannot be aligned (then nothing is highlighted).
   */
  function alignBlock(prev, next, ph) {
    const P = Array.from(prev);
    const N = Array.from(next);
    const np = P.length;
    const nn = N.length;
    const ok = Array.from({ length: np + 1 }, () => new Uint8Array(nn + 1));
    ok[np][nn] = 1;
    for (let i = np - 1; i >= 0; i--) {
      const rest = ok[i + 1];
      const row = ok[i];
      if (P[i] !== ph) {
        for (let j = 0; j < nn; j++) row[j] = N[j] === P[i] && rest[j + 1] ? 1 : 0;
        continue;
      }
      let reach = 0; // some placeholder-free next[j:k] with rest[k]
      for (let j = nn; j >= 0; j--) {
        reach = rest[j] || (j < nn && N[j] !== ph && reach) ? 1 : 0;
        row[j] = reach || (j < nn && N[j] === ph && rest[j + 1]) ? 1 : 0;
      }
    }
    if (!ok[0][0]) return null;
    const segments = [];
    const push = (kind, text) => {
      const last = segments[segments.length - 1];
      if (last && last.kind === kind && kind !== "mask") last.text += text;
      else segments.push(kind === "mask" ? { kind } : { kind, text });
    };
    let j = 0;
    for (let i = 0; i < np; i++) {
      if (P[i] !== ph) {
        push("text", N[j]);
        j += 1;
      } else if (N[j] === ph && ok[i + 1][j + 1]) {
        push("mask");
        j += 1;
      } else {
        let k = j + 1; // prefer the shortest non-empty token text; an empty piece is the last resort
        while (k <= nn && N[k - 1] !== ph && !ok[i + 1][k]) k += 1;
        if (k > nn || N[k - 1] === ph) k = j;
        if (k > j) push("fresh", N.slice(j, k).join(""));
        j = k;
      }
    }
    return segments;
  }

  function renderConversation() {
    const items = app.history.map((message) => {
      const item = document.createElement("p");
      item.className = `turn ${message.role}`;
      const who = document.createElement("strong");
      who.textContent = message.role === "user" ? "You: " : "Model: ";
      item.append(who, document.createTextNode(message.content));
      return item;
    });
    el.conversation.replaceChildren(...items);
    onModeChange();
  }

  init();
})();
