#!/usr/bin/env python3
"""Writes the seed corpus (fuzz/corpus/<target>/): the frames, envelopes and handshakes of the
unit and end-to-end tests. Run again after changing it; the fuzzers add their finds beside these."""
import base64, hashlib, hmac, json, os, struct, zlib

HERE = os.path.dirname(os.path.abspath(__file__))

def pack(value):
    """MessagePack of a JSON value: the subset the node writes (maps with string keys)."""
    if value is None: return b"\xc0"
    if value is True: return b"\xc3"
    if value is False: return b"\xc2"
    if isinstance(value, int):
        if 0 <= value < 128: return bytes([value])
        if -32 <= value < 0: return struct.pack("b", value)
        if value >= 0: return b"\xcf" + struct.pack(">Q", value)
        return b"\xd3" + struct.pack(">q", value)
    if isinstance(value, float): return b"\xcb" + struct.pack(">d", value)
    if isinstance(value, str):
        raw = value.encode()
        if len(raw) < 32: return bytes([0xa0 | len(raw)]) + raw
        return b"\xda" + struct.pack(">H", len(raw)) + raw
    if isinstance(value, list):
        head = bytes([0x90 | len(value)]) if len(value) < 16 else b"\xdc" + struct.pack(">H", len(value))
        return head + b"".join(pack(item) for item in value)
    head = bytes([0x80 | len(value)]) if len(value) < 16 else b"\xde" + struct.pack(">H", len(value))
    return head + b"".join(pack(key) + pack(item) for key, item in value.items())

since = {"offset": 4, "epoch": "e1"}
frames = [
    {"type": "subscribe", "room": "chat", "id": 1, "since": since, "presence_events": True},
    {"type": "subscribe", "room": "chat"},
    {"type": "unsubscribe", "room": "chat", "id": 2},
    {"type": "publish", "room": "chat", "id": 3, "data": {"text": "hi", "n": [1, 2.5, None, True]}},
    {"type": "send", "to": "bob", "data": "hello"},
    {"type": "presence", "room": "chat", "id": 5},
    {"type": "history", "room": "chat", "id": 6, "since": {"offset": 1, "epoch": "e1"}, "limit": 10},
    {"type": "ping", "id": 18446744073709551615},
    {"type": "ping", "id": 1, "future": "field"},
    {"type": "dance", "id": 4},
    {"type": "publish", "id": 8, "room": "r"},
    {"type": "publish", "room": "r", "data": [[[[[[[[[[-1, -100, 70000]]]]]]]]]]},
]
sender = {"user": "alice", "session": "s1"}
envelopes = [
    b"1m42:ep0ch:" + pack({"data": {"a": [1, "b"]}, "from": sender}),
    b"1m7:e1:" + pack({"data": "x"}),
    b"1js1\nalice",
    b"1ls1\nalice",
    b"1d" + pack({"user": "bob", "data": 1, "from": sender}),
    b"1x" + pack({"user": "bob", "code": 1008, "reason": "kicked"}),
    b"1b" + pack("all"),
]

def token(claims):
    encode = lambda raw: base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    message = encode(b'{"alg":"HS256","typ":"JWT"}') + "." + encode(json.dumps(claims).encode())
    signature = hmac.new(b"fuzz-secret-0123456789abcdef", message.encode(), hashlib.sha256).digest()
    return message + "." + encode(signature)

claims = {"sub": "alice", "exp": 4102444800, "iss": "https://issuer.test", "aud": "switchboard",
          "rooms": ["chat", "user.alice.*"], "publish": ["*"], "info": {"name": "Alice"}}
upgrade = ("Host: node\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
handshakes = [
    f"GET /ws?token={token(claims)} HTTP/1.1\r\n{upgrade}\r\n",
    f"GET /ws HTTP/1.1\r\n{upgrade}Authorization: Bearer {token(claims)}\r\n"
    "Sec-WebSocket-Protocol: mqtt, switchboard.v1.msgpack\r\n\r\n",
    f"GET /ws?user=bob&token= HTTP/1.1\r\n{upgrade}X-Forwarded-For: 203.0.113.9, 10.0.0.2\r\n"
    "Sec-WebSocket-Protocol: switchboard.v1.json\r\n\r\n",
    "GET /ws?claims=" + json.dumps(claims).replace(" ", "") + f" HTTP/1.1\r\n{upgrade}\r\n",
    f"GET /ws?claims={{\"sub\":\"a\",\"exp\":18446744073709551615}} HTTP/1.1\r\n{upgrade}"
    "X-Forwarded-For: ::1, bogus\r\n\r\n",
]

def write(target, seeds):
    folder = os.path.join(HERE, "corpus", target)
    os.makedirs(folder, exist_ok=True)
    for index, seed in enumerate(seeds):
        with open(os.path.join(folder, f"seed-{index:02}"), "wb") as file:
            file.write(seed)

write("json_frame", [json.dumps(frame).encode() for frame in frames] + [b"{not json", b'{"id":2}'])
write("msgpack_frame", [pack(frame) for frame in frames] + [b"\xc1\xff\x00", b"\xdd\xff\xff\xff\xff"])
def deflate(raw):
    """A switchboard.v1.json+deflate frame holding `raw` compressed: flag 1, then raw DEFLATE."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return b"\x01" + compressor.compress(raw) + compressor.flush()

write("deflate_frame", [b"\x00" + json.dumps(frame).encode() for frame in frames]
      + [deflate(json.dumps(frame).encode()) for frame in frames]
      + [deflate(b'{"type":"publish","room":"r","data":"' + b"0" * 100000 + b'"}'),
         b"\x01\xff\xff\xff", b"\x07{}", b""])
write("envelope", envelopes)
write("handshake", [head.encode() for head in handshakes])
