"""The observer every differential scenario talks through.

A scenario is a function `scenario(o)` that drives a broker through pika (a third-party client)
or, for what no library will send, through `o.raw()` (bytes on a socket). Everything a client can
see goes into `o.log` through `o.call`, `o.get`, `o.consume` and `o.note`: replies and their
fields, close codes with the class/method id they blame, message counts, bodies, properties,
redelivered flags and delivery order. The runner plays each scenario against RabbitMQ and
against shardmq and compares the two logs line by line.

Reply texts differ between brokers in wording and are not compared; codes and ids are.
"""

import re
import socket
import struct
import time

import pika
from pika import channel as pika_channel
from pika import connection as pika_connection
from pika import exceptions

# The class/method ids of the last channel.close / connection.close each broker sent; pika keeps
# only code and text in its exceptions.
_CLOSES = []


def _remember(kind, original):
    def wrapper(self, method_frame):
        m = method_frame.method
        _CLOSES.append((kind, m.reply_code, m.class_id, m.method_id, m.reply_text))
        return original(self, method_frame)
    return wrapper


pika_channel.Channel._on_close_from_broker = _remember(
    "channel.close", pika_channel.Channel._on_close_from_broker)
pika_connection.Connection._on_connection_close_from_broker = _remember(
    "connection.close", pika_connection.Connection._on_connection_close_from_broker)

GENERATED = [
    (re.compile(r"amq\.gen-[A-Za-z0-9_\-]+"), "amq.gen-*"),
    (re.compile(r"amq\.ctag-[A-Za-z0-9_\-]+"), "amq.ctag-*"),
    # direct reply-to addresses: opaque, each broker's own form
    (re.compile(r"amq\.rabbitmq\.reply-to\.[A-Za-z0-9+/=._\-]+"), "amq.rabbitmq.reply-to.*"),
    # pika's own consumer tags: ctag<n>.<uuid4 hex>
    (re.compile(r"ctag(\d+)\.[0-9a-f]{32}"), r"ctag\1.*"),
]


def normalize(value):
    """Server-generated names differ by design; everything else is compared as is."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        for pattern, replacement in GENERATED:
            value = pattern.sub(replacement, value)
        return value
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [normalize(v) for v in value]
    return value


def method_fields(frame):
    """(name, fields) of a pika method frame or method object."""
    method = getattr(frame, "method", frame)
    fields = {k: v for k, v in vars(method).items() if not k.startswith("_")}
    return method.NAME, normalize(fields)


def properties_fields(properties):
    if properties is None:
        return None
    fields = {k: v for k, v in vars(properties).items() if v is not None and not k.startswith("_")}
    return normalize(fields)


class Observer:
    def __init__(self, port, scenario):
        self.port = port
        self.scenario = scenario
        self.log = []
        self.texts = []
        self.connections = []

    # -- names and connections -------------------------------------------------------------

    def name(self, suffix=""):
        """A name unique to this scenario (both brokers see the same one)."""
        return f"diff.{self.scenario}{'.' + suffix if suffix else ''}"

    def parameters(self, **overrides):
        options = dict(host="127.0.0.1", port=self.port, heartbeat=0,
                       credentials=pika.PlainCredentials("guest", "guest"),
                       blocked_connection_timeout=10, socket_timeout=10,
                       connection_attempts=1)
        options.update(overrides)
        return pika.ConnectionParameters(**options)

    def connect(self, **overrides):
        connection = pika.BlockingConnection(self.parameters(**overrides))
        self.connections.append(connection)
        return connection

    def channel(self, connection=None):
        return (connection or self.connect()).channel()

    def close_all(self):
        for connection in self.connections:
            try:
                if connection.is_open:
                    connection.close()
            except Exception:
                pass

    # -- recording ---------------------------------------------------------------------------

    def note(self, *items):
        self.log.append(normalize(list(items)))

    def call(self, label, action):
        """Runs `action()`; records its reply, or the close it caused, under `label`."""
        before = len(_CLOSES)
        try:
            result = action()
        except (exceptions.ChannelClosedByBroker, exceptions.ConnectionClosedByBroker,
                exceptions.ProbableAccessDeniedError, exceptions.ProbableAuthenticationError,
                exceptions.AuthenticationError, exceptions.ConnectionClosed,
                exceptions.ChannelClosed) as e:
            self._record_close(label, before, e)
            return None
        except exceptions.UnroutableError as e:
            self.note(label, "returned", [self._returned(m) for m in e.messages])
            return None
        except exceptions.NackError as e:
            self.note(label, "nacked", len(e.messages))
            return None
        self.note(label, "ok", self._describe(result))
        return result

    def _record_close(self, label, before, error):
        if len(_CLOSES) > before:
            kind, code, class_id, method_id, text = _CLOSES[-1]
            self.texts.append((label, text))
            self.note(label, kind, code, class_id, method_id)
        else:
            self.note(label, "closed", type(error).__name__)

    @staticmethod
    def _returned(message):
        return [message.method.reply_code, message.method.exchange, message.method.routing_key,
                message.body]

    def _describe(self, result):
        if result is None:
            return None
        if isinstance(result, tuple) and len(result) == 3:  # basic_get
            method, properties, body = result
            if method is None:
                return "get-empty"
            return [method_fields(method), properties_fields(properties), body]
        if hasattr(result, "method") or hasattr(result, "NAME"):
            return method_fields(result)
        if isinstance(result, (str, int, bool, bytes, list, dict)):
            return result
        return type(result).__name__

    # -- common steps ------------------------------------------------------------------------

    def get(self, channel, queue, label="get", auto_ack=False):
        return self.call(label, lambda: channel.basic_get(queue, auto_ack=auto_ack))

    def publish(self, channel, body, routing_key, exchange="", label="publish", **options):
        properties = options.pop("properties", None)
        return self.call(label, lambda: channel.basic_publish(
            exchange, routing_key, body, properties=properties, **options))

    def consume(self, connection, channel, queue, count, label="consume", auto_ack=False,
                ack=False, wait=2.0, **options):
        """Consumes until `count` deliveries arrive (or `wait` seconds pass); records them."""
        deliveries = []

        def on_message(ch, method, properties, body):
            deliveries.append([method.delivery_tag, method.redelivered, method.exchange,
                               method.routing_key, properties_fields(properties), body])
            if ack:
                ch.basic_ack(method.delivery_tag)

        tag = self.call(label + ".consume-ok",
                        lambda: channel.basic_consume(queue, on_message, auto_ack=auto_ack,
                                                      **options))
        deadline = time.time() + wait
        while len(deliveries) < count and time.time() < deadline:
            try:
                connection.process_data_events(time_limit=0.05)
            except (exceptions.ChannelClosedByBroker, exceptions.ConnectionClosedByBroker) as e:
                self._record_close(label, len(_CLOSES) - 1, e)
                break
        self.note(label, "deliveries", deliveries)
        return tag, deliveries

    def settle(self, connection, seconds=0.15):
        """Lets asynchronous frames (acks, returns, cancels) arrive."""
        deadline = time.time() + seconds
        while time.time() < deadline:
            connection.process_data_events(time_limit=0.03)

    def passive_counts(self, queue, label="counts"):
        """message and consumer counts of `queue`, from a passive declare on a fresh channel."""
        connection = self.connect()
        channel = connection.channel()
        self.call(label, lambda: channel.queue_declare(queue, passive=True))
        try:
            connection.close()
        except Exception:
            pass

    def raw(self, **handshake):
        client = RawClient(self.port)
        if handshake.get("open", True):
            client.handshake(channel_max=handshake.get("channel_max", 0),
                             frame_max=handshake.get("frame_max", 0))
        return client


# -- a byte-level peer for what no client library sends --------------------------------------

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"


def frame(frame_type, channel, payload):
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + b"\xce"


def shortstr(value):
    data = value.encode() if isinstance(value, str) else value
    return bytes([len(data)]) + data


def longstr(value):
    data = value.encode() if isinstance(value, str) else value
    return struct.pack(">I", len(data)) + data


def method(channel, class_id, method_id, arguments=b""):
    return frame(1, channel, struct.pack(">HH", class_id, method_id) + arguments)


class NoAnswer(Exception):
    pass


class RawClient:
    ANSWER_SECONDS = 2

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=self.ANSWER_SECONDS)
        self.buffer = b""

    def send(self, data):
        self.sock.sendall(data)

    def _read(self, n):
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def read_frame(self):
        """(type, channel, payload), or None when the socket closed; NoAnswer on silence."""
        try:
            header = self._read(7)
            if header is None:
                return None
            frame_type, channel, size = struct.unpack(">BHI", header)
            rest = self._read(size + 1)
            if rest is None:
                return None
            return frame_type, channel, rest[:-1]
        except socket.timeout:
            raise NoAnswer()
        except ConnectionResetError:
            return None

    def read_method(self):
        """The next method frame's (channel, class, method, arguments), skipping heartbeats."""
        while True:
            got = self.read_frame()
            if got is None:
                return None
            frame_type, channel, payload = got
            if frame_type == 1:
                class_id, method_id = struct.unpack(">HH", payload[:4])
                return channel, class_id, method_id, payload[4:]

    def closed(self, seconds=3):
        """Whether the broker closes the socket within `seconds` (answering close-ok first)."""
        self.sock.settimeout(seconds)
        deadline = time.time() + seconds
        try:
            while time.time() < deadline:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except ConnectionResetError:
            return True
        except (socket.timeout, OSError):
            return False
        return False

    def handshake(self, channel_max=0, frame_max=0):
        self.send(PROTOCOL_HEADER)
        assert self.read_method()[1:3] == (10, 10)
        self.send(method(0, 10, 11, struct.pack(">I", 0) + shortstr("PLAIN")
                         + longstr(b"\0guest\0guest") + shortstr("en_US")))
        _, _, _, tune = self.read_method()
        offered_channels, offered_frame, _ = struct.unpack(">HIH", tune[:8])
        self.send(method(0, 10, 31, struct.pack(">HIH", channel_max or offered_channels,
                                                frame_max or offered_frame, 0)))
        self.send(method(0, 10, 40, shortstr("/") + shortstr("") + b"\0"))
        assert self.read_method()[1:3] == (10, 41)

    def answer(self):
        """What the broker says next, as a comparable record: the method ids and, for closes,
        the reply code and the class/method blamed; "socket-closed" when it hangs up,
        "no-answer" when it says nothing for ANSWER_SECONDS."""
        try:
            got = self.read_method()
        except NoAnswer:
            return ["no-answer"]
        if got is None:
            return ["socket-closed"]
        channel, class_id, method_id, arguments = got
        if (class_id, method_id) in ((10, 50), (20, 40)):
            code = struct.unpack(">H", arguments[:2])[0]
            text_len = arguments[2]
            blamed = struct.unpack(">HH", arguments[3 + text_len:7 + text_len])
            if class_id == 10:
                self.send(method(0, 10, 51))
            else:
                self.send(method(channel, 20, 41))
            return ["close", channel, class_id, method_id, code, list(blamed)]
        return ["method", channel, class_id, method_id]
