#!/usr/bin/env node
// Scenarios driven by Node's amqplib, a client from a third ecosystem, against a real shardmq.
//
// Run from the repository root (.ci/run does): `node tests/clients/amqplib_scenarios.js`. It
// installs amqplib into target/node-clients if needed, starts target/debug/shardmq on a free
// loopback port with a temporary data directory (2 shards, queues spread over both), runs every
// scenario, stops the broker by PID, and prints one line per scenario and "N passed, N failed".
//
// amqplib has no API for transactions (tx.*); the pika scenarios and the differential suite
// cover those.

'use strict';

const { spawn, execFileSync } = require('child_process');
const fs = require('fs');
const net = require('net');
const os = require('os');
const path = require('path');
const assert = require('assert/strict');

const ROOT = path.resolve(__dirname, '..', '..');
const CLIENTS = path.join(ROOT, 'target', 'node-clients');
const AMQPLIB_VERSION = '0.10.9';

function ensureAmqplib() {
  const installed = path.join(CLIENTS, 'node_modules', 'amqplib', 'package.json');
  if (!fs.existsSync(installed)) {
    fs.mkdirSync(CLIENTS, { recursive: true });
    execFileSync('npm', ['install', '--no-audit', '--no-fund', '--silent', '--prefix', CLIENTS,
      `amqplib@${AMQPLIB_VERSION}`], { stdio: 'inherit' });
  }
  return require(path.join(CLIENTS, 'node_modules', 'amqplib'));
}

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

async function startBroker(dataDir) {
  const binary = path.join(ROOT, 'target', 'debug', 'shardmq');
  if (!fs.existsSync(binary)) {
    execFileSync('cargo', ['build', '-q', '--bin', 'shardmq'], { cwd: ROOT, stdio: 'inherit' });
  }
  const config = path.join(dataDir, 'config.toml');
  fs.writeFileSync(config, '[queues]\nplacement = "balanced"\n');
  const port = await freePort();
  const log = fs.openSync(path.join(dataDir, 'broker.log'), 'w');
  const child = spawn(binary, ['--config', config, '--listen', `127.0.0.1:${port}`, '--shards', '2',
    '--data-dir', path.join(dataDir, 'data'), '--log-level', 'warn'],
  { stdio: ['ignore', 'ignore', log] });
  const deadline = Date.now() + 30000;
  while (Date.now() < deadline) {
    const up = await new Promise((resolve) => {
      const socket = net.connect(port, '127.0.0.1', () => { socket.end(); resolve(true); });
      socket.on('error', () => resolve(false));
    });
    if (up) return { child, port };
    await sleep(100);
  }
  child.kill('SIGKILL');
  throw new Error('shardmq did not start');
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Waits until `count` messages arrive on `queue` through a consumer; returns them.
function collect(channel, queue, count, options = {}) {
  return new Promise((resolve, reject) => {
    const got = [];
    const timer = setTimeout(() => reject(new Error(`got ${got.length} of ${count}`)), 10000);
    channel.consume(queue, (message) => {
      got.push(message);
      if (options.ack) channel.ack(message);
      if (got.length === count) {
        clearTimeout(timer);
        resolve(got);
      }
    }, { noAck: !!options.noAck }).catch(reject);
  });
}

// Resolves with the close error of `channel` (the broker's reply code is in `code`).
function closedWith(channel) {
  return new Promise((resolve) => channel.once('error', resolve));
}

function scenarios(amqp, url) {
  return {
    async declare_bind_publish_get() {
      const connection = await amqp.connect(url);
      const channel = await connection.createChannel();
      const q = await channel.assertQueue('node.direct');
      assert.equal(q.messageCount, 0);
      await channel.assertExchange('node.x', 'direct', { durable: false });
      await channel.bindQueue('node.direct', 'node.x', 'k');
      channel.publish('node.x', 'k', Buffer.from('hello'), {
        contentType: 'text/plain', headers: { n: 1, s: 'two', nested: { deep: true } },
        correlationId: 'c-1', messageId: 'm-1', priority: 3,
      });
      let message = false;
      for (let i = 0; i < 50 && !message; i++) {
        message = await channel.get('node.direct', { noAck: true });
        if (!message) await sleep(20);
      }
      assert.ok(message, 'message arrives');
      assert.equal(message.content.toString(), 'hello');
      assert.equal(message.properties.contentType, 'text/plain');
      assert.deepEqual(message.properties.headers, { n: 1, s: 'two', nested: { deep: true } });
      assert.equal(message.properties.correlationId, 'c-1');
      assert.equal(message.properties.priority, 3);
      assert.equal(await channel.get('node.direct'), false);
      await connection.close();
    },

    async publisher_confirms() {
      const connection = await amqp.connect(url);
      const channel = await connection.createConfirmChannel();
      await channel.assertQueue('node.confirms');
      for (let i = 0; i < 500; i++) {
        channel.sendToQueue('node.confirms', Buffer.from(`m${i}`), { persistent: i % 2 === 0 });
      }
      await channel.waitForConfirms();
      const check = await channel.checkQueue('node.confirms');
      assert.equal(check.messageCount, 500);
      await channel.deleteQueue('node.confirms');
      await connection.close();
    },

    async consume_with_acks_and_prefetch() {
      const connection = await amqp.connect(url);
      const publisher = await connection.createConfirmChannel();
      await publisher.assertQueue('node.prefetch');
      for (let i = 0; i < 10; i++) publisher.sendToQueue('node.prefetch', Buffer.from(`${i}`));
      await publisher.waitForConfirms();
      const consumer = await connection.createChannel();
      await consumer.prefetch(3);
      const held = [];
      await consumer.consume('node.prefetch', (message) => held.push(message));
      await sleep(300);
      assert.equal(held.length, 3, 'prefetch limits unacked deliveries');
      consumer.ack(held[2], true); // multiple: acks the first three
      await sleep(300);
      assert.equal(held.length, 6);
      for (const message of held.slice(3)) consumer.ack(message);
      await sleep(300);
      assert.equal(held.length, 9);
      consumer.ackAll();
      await sleep(300);
      assert.equal(held.length, 10);
      assert.deepEqual(held.map((m) => m.content.toString()), ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9']);
      consumer.ackAll();
      await connection.close();
    },

    async nack_requeue_redelivers() {
      const connection = await amqp.connect(url);
      const channel = await connection.createConfirmChannel();
      await channel.assertQueue('node.nack');
      channel.sendToQueue('node.nack', Buffer.from('again'));
      await channel.waitForConfirms();
      const first = await channel.get('node.nack');
      assert.equal(first.fields.redelivered, false);
      channel.nack(first, false, true);
      const second = await channel.get('node.nack');
      assert.equal(second.content.toString(), 'again');
      assert.equal(second.fields.redelivered, true);
      channel.reject(second, false);
      assert.equal(await channel.get('node.nack'), false);
      await connection.close();
    },

    async exclusive_queue_is_locked() {
      const owner = await amqp.connect(url);
      const ownerChannel = await owner.createChannel();
      const { queue } = await ownerChannel.assertQueue('', { exclusive: true });
      assert.match(queue, /^amq\.gen-/);
      const other = await amqp.connect(url);
      const otherChannel = await other.createChannel();
      const closed = closedWith(otherChannel);
      await assert.rejects(otherChannel.assertQueue(queue, { exclusive: true }));
      assert.equal((await closed).code, 405);
      await owner.close();
      const again = await other.createChannel();
      const closedAgain = closedWith(again);
      await assert.rejects(again.checkQueue(queue));
      assert.equal((await closedAgain).code, 404, 'deleted with its owner');
      await other.close();
    },

    async mandatory_return() {
      const connection = await amqp.connect(url);
      const channel = await connection.createConfirmChannel();
      const returned = new Promise((resolve) => channel.once('return', resolve));
      channel.publish('', 'node.nobody-home', Buffer.from('back'), { mandatory: true });
      await channel.waitForConfirms();
      const message = await returned;
      assert.equal(message.fields.replyCode, 312);
      assert.equal(message.fields.routingKey, 'node.nobody-home');
      assert.equal(message.content.toString(), 'back');
      await connection.close();
    },

    async large_message() {
      const connection = await amqp.connect(url);
      const channel = await connection.createConfirmChannel();
      await channel.assertQueue('node.large');
      const body = Buffer.alloc(10 * 1024 * 1024);
      for (let i = 0; i < body.length; i++) body[i] = i % 251;
      channel.sendToQueue('node.large', body);
      await channel.waitForConfirms();
      const [message] = await collect(channel, 'node.large', 1, { ack: true });
      assert.equal(message.content.length, body.length);
      assert.ok(message.content.equals(body), '10 MB body intact');
      await connection.close();
    },

    async fanout_and_topic_routing() {
      const connection = await amqp.connect(url);
      const channel = await connection.createConfirmChannel();
      await channel.assertExchange('node.fan', 'fanout', { durable: false });
      await channel.assertExchange('node.topic', 'topic', { durable: false });
      for (const q of ['node.f1', 'node.f2']) {
        await channel.assertQueue(q);
        await channel.bindQueue(q, 'node.fan', '');
      }
      await channel.assertQueue('node.t');
      await channel.bindQueue('node.t', 'node.topic', 'a.*.c');
      channel.publish('node.fan', 'ignored', Buffer.from('to both'));
      channel.publish('node.topic', 'a.b.c', Buffer.from('match'));
      channel.publish('node.topic', 'a.b.d', Buffer.from('no match'));
      await channel.waitForConfirms();
      for (const q of ['node.f1', 'node.f2']) {
        assert.equal((await channel.checkQueue(q)).messageCount, 1);
      }
      const [message] = await collect(channel, 'node.t', 1, { noAck: true });
      assert.equal(message.content.toString(), 'match');
      await connection.close();
    },

    async dead_letters_and_expiry_through_queue_options() {
      const connection = await amqp.connect(url);
      const channel = await connection.createConfirmChannel();
      // amqplib's own option names become the x-arguments.
      await channel.assertQueue('node.dead');
      await channel.assertQueue('node.expiring', {
        messageTtl: 100, deadLetterExchange: '', deadLetterRoutingKey: 'node.dead', maxLength: 2,
      });
      for (let i = 0; i < 3; i++) channel.sendToQueue('node.expiring', Buffer.from(`m${i}`));
      await channel.waitForConfirms();
      const letters = await collect(channel, 'node.dead', 3, { noAck: true });
      const seen = letters.map((m) => [
        m.content.toString(), m.properties.headers['x-death'][0].reason,
      ]);
      // m0 pushed out by the length limit at once, the other two expired.
      assert.deepEqual(seen, [['m0', 'maxlen'], ['m1', 'expired'], ['m2', 'expired']]);
      assert.equal((await channel.checkQueue('node.expiring')).messageCount, 0);
      await connection.close();
    },

    async rpc_over_direct_reply_to() {
      const connection = await amqp.connect(url);
      const server = await connection.createChannel();
      await server.assertQueue('node.rpc');
      await server.consume('node.rpc', (request) => {
        server.sendToQueue(request.properties.replyTo,
          Buffer.from(request.content.toString().toUpperCase()),
          { correlationId: request.properties.correlationId });
      }, { noAck: true });
      const client = await connection.createChannel();
      const replies = [];
      const done = new Promise((resolve) => {
        client.consume('amq.rabbitmq.reply-to', (reply) => {
          replies.push([reply.properties.correlationId, reply.content.toString()]);
          if (replies.length === 3) resolve();
        }, { noAck: true });
      });
      // The consume goes out first on this channel, so the broker knows the reply consumer.
      for (const word of ['a', 'b', 'c']) {
        client.sendToQueue('node.rpc', Buffer.from(word),
          { replyTo: 'amq.rabbitmq.reply-to', correlationId: word });
      }
      await Promise.race([done, sleep(10000)]);
      assert.deepEqual(replies, [['a', 'A'], ['b', 'B'], ['c', 'C']]);
      await connection.close();
    },

    async errors_close_the_channel_with_codes() {
      const connection = await amqp.connect(url);
      const missing = await connection.createChannel();
      const closed = closedWith(missing);
      await assert.rejects(missing.checkQueue('node.does-not-exist'));
      assert.equal((await closed).code, 404);
      const reserved = await connection.createChannel();
      const refused = closedWith(reserved);
      await assert.rejects(reserved.assertExchange('amq.custom', 'direct'));
      assert.equal((await refused).code, 403);
      const mismatched = await connection.createChannel();
      await mismatched.assertQueue('node.mismatch', { durable: false });
      const precondition = closedWith(mismatched);
      await assert.rejects(mismatched.assertQueue('node.mismatch', { durable: true }));
      assert.equal((await precondition).code, 406);
      // The connection itself survives channel errors.
      const fine = await connection.createChannel();
      await fine.checkQueue('node.mismatch');
      await connection.close();
    },
  };
}

async function main() {
  const amqp = ensureAmqplib();
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'shardmq-amqplib-'));
  const { child, port } = await startBroker(dataDir);
  const url = `amqp://guest:guest@127.0.0.1:${port}`;
  let passed = 0;
  let failed = 0;
  try {
    for (const [name, run] of Object.entries(scenarios(amqp, url))) {
      try {
        await Promise.race([run(), sleep(30000).then(() => { throw new Error('timed out'); })]);
        passed++;
        console.log(`amqplib ${name} ... ok`);
      } catch (error) {
        failed++;
        console.log(`amqplib ${name} ... FAILED\n${error.stack}`);
      }
    }
  } finally {
    child.kill('SIGTERM');
    await new Promise((resolve) => {
      const timer = setTimeout(() => { child.kill('SIGKILL'); resolve(); }, 15000);
      child.once('exit', () => { clearTimeout(timer); resolve(); });
    });
    if (failed) console.log(fs.readFileSync(path.join(dataDir, 'broker.log'), 'utf8').slice(-4000));
    fs.rmSync(dataDir, { recursive: true, force: true });
  }
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
