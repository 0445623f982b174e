#!/usr/bin/env node
// A real SMPP 3.4 peer on loopback for medclear's tests and embedded stack: the npm
// `smpp` package's server, not a mock of our client.
//
//   node server.js --port 0 --system-id medclear --password secret --out messages.jsonl
//
// - binds (transmitter / transceiver) only with the configured system id and password;
// - accepts submit_sm, answers with a message id, and appends one JSON line per PDU
//   ({"kind": "part", ...}) and one per complete message ({"kind": "message", ...}) to
//   --out; concatenated parts (UDH IE 0x00 or 0x08) are reassembled in sequence order;
// - sends a delivery receipt (deliver_sm, esm_class 0x04) for every submit_sm that asked
//   for one (registered_delivery & 1), after --receipt-delay-ms;
// - prints "SMSC listening on HOST:PORT" once it accepts connections;
// - SIGTERM / SIGINT: stops accepting connections, sends every bound session an unbind,
//   refuses (ESME_RSYSERR, "try again later", nothing recorded) any submit_sm that still
//   comes, closes each session once it answered the unbind or after UNBIND_WAIT_MS, and
//   exits 0. Every submit_sm it recorded has had its answer written before the close.
//   (Closing at once, as it did, left submit_sm that arrived after the close recorded but
//   unanswered: the client sent them again, and the drills counted a doubled SMS.)
//
// A line is appended (synchronously) before the submit_sm_resp is sent, so everything the
// client was told is accepted is in the file.
'use strict';

const fs = require('fs');
const smpp = require('smpp');

const MESSAGE_STATE_DELIVERED = 2;
const UNBIND_WAIT_MS = 300; // for a client's unbind_resp before the session is closed
let stopping = false;

function options(argv) {
  const out = {
    host: '127.0.0.1',
    port: 2775,
    systemId: 'medclear',
    password: 'medclear',
    out: '',
    receiptDelayMs: 50,
  };
  const names = {
    '--host': 'host', '--port': 'port', '--system-id': 'systemId', '--password': 'password',
    '--out': 'out', '--receipt-delay-ms': 'receiptDelayMs',
  };
  for (let i = 2; i < argv.length; i += 2) {
    const name = names[argv[i]];
    if (!name || i + 1 >= argv.length) {
      console.error(`usage: server.js [--host H] [--port P] [--system-id S] [--password W] ` +
                    `[--out FILE] [--receipt-delay-ms N]; bad argument ${argv[i]}`);
      process.exit(2);
    }
    out[name] = argv[i + 1];
  }
  out.port = Number(out.port);
  out.receiptDelayMs = Number(out.receiptDelayMs);
  return out;
}

const opts = options(process.argv);
const started = Date.now().toString(36);
let counter = 0;
const pendingParts = new Map(); // "src|dst|ref" -> {total, parts: Map(seq -> text), ids: []}

function record(line) {
  if (opts.out) {
    fs.appendFileSync(opts.out, JSON.stringify(line) + '\n');
  }
}

function concatInfo(udhList) {
  for (const ie of udhList || []) {
    if (ie[0] === 0x00 && ie.length >= 5) {
      return {ref: ie[2], total: ie[3], seq: ie[4]};
    }
    if (ie[0] === 0x08 && ie.length >= 6) {
      return {ref: ie.readUInt16BE(2), total: ie[4], seq: ie[5]};
    }
  }
  return null;
}

function yymmddhhmm(date) {
  const p = (n) => String(n).padStart(2, '0');
  return p(date.getUTCFullYear() % 100) + p(date.getUTCMonth() + 1) + p(date.getUTCDate()) +
    p(date.getUTCHours()) + p(date.getUTCMinutes());
}

function onSubmit(session, pdu) {
  counter += 1;
  const messageId = `${started}-${counter}`;
  const body = pdu.short_message || {};
  const text = typeof body === 'string' ? body : String(body.message || '');
  const concat = concatInfo(body.udh);
  const base = {
    source: pdu.source_addr,
    destination: pdu.destination_addr,
    data_coding: pdu.data_coding,
    esm_class: pdu.esm_class,
    received_at_ms: Date.now(),
  };
  record({kind: 'part', message_id: messageId, text, concat, ...base});
  if (concat === null || concat.total <= 1) {
    record({kind: 'message', text, parts: 1, message_ids: [messageId], ...base});
  } else {
    const key = `${pdu.source_addr}|${pdu.destination_addr}|${concat.ref}`;
    let entry = pendingParts.get(key);
    if (!entry) {
      entry = {total: concat.total, parts: new Map(), ids: []};
      pendingParts.set(key, entry);
    }
    if (entry.parts.has(concat.seq)) {
      record({kind: 'duplicate_part', message_id: messageId, concat, ...base});
    }
    entry.parts.set(concat.seq, text);
    entry.ids.push(messageId);
    if (entry.parts.size === entry.total) {
      pendingParts.delete(key);
      const seqs = [...entry.parts.keys()].sort((a, b) => a - b);
      record({kind: 'message', text: seqs.map((s) => entry.parts.get(s)).join(''),
              parts: entry.total, message_ids: entry.ids, ...base});
    }
  }
  session.send(pdu.response({message_id: messageId}));
  if (pdu.registered_delivery & 1) {
    setTimeout(() => {
      if (session.closed) {
        return;
      }
      const now = yymmddhhmm(new Date());
      session.deliver_sm({
        source_addr: pdu.destination_addr,
        destination_addr: pdu.source_addr,
        esm_class: 0x04,
        short_message: `id:${messageId} sub:001 dlvrd:001 submit date:${now} ` +
          `done date:${now} stat:DELIVRD err:000 text:`,
        receipted_message_id: messageId,
        message_state: MESSAGE_STATE_DELIVERED,
      });
    }, opts.receiptDelayMs);
  }
}

const server = smpp.createServer((session) => {
  let bound = false;
  session.on('error', () => session.destroy());
  session.on('close', () => { session.closed = true; });
  const bind = (pdu) => {
    if (pdu.system_id !== opts.systemId || pdu.password !== opts.password) {
      session.send(pdu.response({command_status: smpp.ESME_RBINDFAIL}));
      record({kind: 'bind_refused', system_id: pdu.system_id});
      session.close();
      return;
    }
    bound = true;
    session.send(pdu.response({system_id: 'medclear-smsc'}));
  };
  session.on('bind_transceiver', bind);
  session.on('bind_transmitter', bind);
  session.on('submit_sm', (pdu) => {
    if (!bound) {
      session.send(pdu.response({command_status: smpp.ESME_RINVBNDSTS}));
      return;
    }
    if (stopping) {
      session.send(pdu.response({command_status: smpp.ESME_RSYSERR}));
      return;
    }
    onSubmit(session, pdu);
  });
  session.on('enquire_link', (pdu) => session.send(pdu.response()));
  session.on('unbind', (pdu) => {
    session.send(pdu.response());
    session.close();
  });
});

server.on('error', (err) => {
  console.error(`SMSC error: ${err.message}`);
  process.exit(1);
});

server.listen(opts.port, opts.host, () => {
  const address = server.address();
  console.log(`SMSC listening on ${address.address}:${address.port}`);
});

function stop() {
  if (stopping) {
    return;
  }
  stopping = true;
  server.close();
  for (const session of [...server.sessions]) {
    if (session.closed) {
      continue;
    }
    const close = () => { if (!session.closed) session.close(); };
    session.unbind({}, close);
    setTimeout(close, UNBIND_WAIT_MS);
  }
  setTimeout(() => process.exit(0), UNBIND_WAIT_MS + 200).unref();
}

process.on('SIGTERM', stop);
process.on('SIGINT', stop);
