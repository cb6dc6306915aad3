'use strict';
// forkd warm worker for Node.js (installed as /usr/lib/forkd/workers/node-worker.js).
//
// Started by the forkd guest agent before the parent snapshot, so every forked child evaluates
// code in an already-running V8. Speaks the agent's worker framing on stdin/stdout (see
// docs/AGENT-PROTOCOL.md): each message is a decimal byte count, a newline, then that many bytes
// of UTF-8. The agent sends code; the worker answers with the output.
//
// Code runs in the worker's global scope, one message at a time:
// - plain scripts run as they are; `var`, functions and `globalThis.x = ...` persist;
// - code with top-level `await` runs inside an async function (its `const`/`let` stay local);
// - the output is everything written to stdout/stderr (console.log ...), then the inspected
//   value of the last expression, if it is not undefined. Errors print their stack.

const vm = require('vm');
const util = require('util');
const Module = require('module');

// npm packages of the recipe live under /opt/forkd/node/node_modules.
const extra = '/opt/forkd/node/node_modules';
if (!module.paths.includes(extra)) module.paths.push(extra);
process.env.NODE_PATH = [extra, process.env.NODE_PATH].filter(Boolean).join(':');
Module._initPaths();
globalThis.require = require;
globalThis.module = module;

// The real stdout carries frames; user output is captured instead.
const realWrite = process.stdout.write.bind(process.stdout);
let captured = [];
const capture = (chunk, encoding, cb) => {
  captured.push(typeof chunk === 'string' ? Buffer.from(chunk, typeof encoding === 'string' ? encoding : 'utf8') : Buffer.from(chunk));
  if (typeof encoding === 'function') encoding();
  else if (typeof cb === 'function') cb();
  return true;
};
process.stdout.write = capture;
process.stderr.write = capture;

function frame(text) {
  const body = Buffer.from(text, 'utf8');
  realWrite(Buffer.concat([Buffer.from(`${body.length}\n`), body]));
}

function compile(code) {
  try {
    return new vm.Script(code, { filename: 'forkd' });
  } catch (e) {
    if (!(e instanceof SyntaxError)) throw e;
    // Top-level await (or a bare object literal): wrap in an async function, as an expression
    // first so its value is returned, else as statements.
    const wrap = (body) => new vm.Script(`(async () => {\n${body}\n})()`, { filename: 'forkd' });
    try {
      return wrap(`return (\n${code}\n);`);
    } catch (_) { /* not a single expression */ }
    // Statements: return the value of the last one when it is an expression. Try the split
    // points (';' or newline) from the end; the first that compiles wins.
    let tries = 0;
    for (let i = code.length - 1; i > 0 && tries < 200; i--) {
      if (code[i] !== ';' && code[i] !== '\n') continue;
      const tail = code.slice(i + 1).trim().replace(/;+$/, '');
      if (!tail) continue;
      tries++;
      try {
        return wrap(`${code.slice(0, i + 1)}\nreturn (\n${tail}\n);`);
      } catch (_) { /* try an earlier split */ }
    }
    try {
      return wrap(code);
    } catch (_) {
      throw e; // report the original syntax error
    }
  }
}

async function evaluate(code) {
  captured = [];
  let value;
  try {
    value = compile(code).runInThisContext();
    if (value && typeof value.then === 'function') value = await value;
  } catch (err) {
    captured.push(Buffer.from(`${err && err.stack ? err.stack : String(err)}\n`));
    value = undefined;
  }
  let out = Buffer.concat(captured).toString('utf8');
  if (value !== undefined) {
    out += (typeof value === 'string' ? value : util.inspect(value, { depth: 4 })) + '\n';
  }
  captured = [];
  return out;
}

// Frame reader: a queue, processed one message at a time.
let pending = Buffer.alloc(0);
const queue = [];
let busy = false;

async function pump() {
  if (busy) return;
  busy = true;
  while (queue.length > 0) {
    const code = queue.shift();
    frame(await evaluate(code));
  }
  busy = false;
}

process.stdin.on('data', (chunk) => {
  pending = Buffer.concat([pending, chunk]);
  for (;;) {
    const nl = pending.indexOf(10);
    if (nl < 0) break;
    const n = Number(pending.subarray(0, nl).toString('ascii').trim());
    if (!Number.isInteger(n) || n < 0) process.exit(2);
    if (pending.length < nl + 1 + n) break;
    queue.push(pending.subarray(nl + 1, nl + 1 + n).toString('utf8'));
    pending = pending.subarray(nl + 1 + n);
  }
  pump();
});
process.stdin.on('end', () => process.exit(0));
process.on('unhandledRejection', (err) => {
  captured.push(Buffer.from(`unhandled rejection: ${err && err.stack ? err.stack : err}\n`));
});
