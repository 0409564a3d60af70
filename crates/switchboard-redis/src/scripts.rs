//! Lua scripts: each runs atomically on one shard, in one round trip. Their contracts are in
//! docs/architecture.md.

use std::sync::LazyLock;

use redis::Script;

/// The first 8 hex digits of the server's run id: the generation of the Redis process. It changes
/// on every restart and differs between a primary and the replica promoted in its place, the two
/// events in which the newest writes can be lost. (A plain `find`: a pattern match over the
/// section costs more than the `INFO` call itself.)
macro_rules! generation {
    () => {
        "local info = redis.call('INFO', 'server')\n\
         local at = string.find(info, 'run_id:', 1, true)\n\
         local gen = string.sub(info, at + 7, at + 14)\n"
    };
}

/// KEYS: meta, log, channel. ARGV: payload, history size, history TTL ms, stream TTL ms, 8 random
/// hex digits. Assigns the next offset, appends to history (stamped with Redis's clock, in ms),
/// publishes `1m<offset>:<epoch>:<payload>`. Returns `{offset, epoch}`. An epoch is the generation
/// that made it followed by the random digits: a stream made by another generation of the server
/// (before a restart or a failover, which may have lost its last offsets) is started over with a
/// new epoch, so an offset is never given to two messages of one epoch.
pub static PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        generation!(),
        r"
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch or string.sub(epoch, 1, 8) ~= gen then
  epoch = gen .. ARGV[5]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0)
end
local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if tonumber(ARGV[2]) > 0 then
  local time = redis.call('TIME')
  local now = time[1] .. string.format('%03d', math.floor(tonumber(time[2]) / 1000))
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], offset .. '-0', 'p', ARGV[1], 't', now)
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
redis.call('PUBLISH', KEYS[3], '1m' .. offset .. ':' .. epoch .. ':' .. ARGV[1])
return {offset, epoch}
",
    ))
});

/// KEYS: meta, log. ARGV: stream TTL ms, mode (`since` or `newest`), since offset, count
/// (negative: no limit), byte budget (negative: none), history TTL ms. Returns `{offset, epoch,
/// entries, more, expired}` read atomically: entries in offset order after the offset (`newest`:
/// after the room's offset less `count`), stopping at `count` entries or before their payloads
/// pass the budget (at least one entry when there is one); `more` is 1 when it stopped before the
/// last entry. Entries older than the history TTL by Redis's clock are skipped (paging on past
/// them, so a page is never empty while fresh entries follow), and `expired` is then 1. A room
/// without state answers `{0, generation, {}, 0, 0}` and is not created; a room whose epoch another
/// generation of the server made is forgotten (see PUBLISH) and answers the same. Entries are
/// fetched a few at a time, sized by what the budget has left, so a log of large payloads is never
/// loaded whole.
pub static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        generation!(),
        r"
local epoch = redis.call('HGET', KEYS[1], 'e')
if epoch and string.sub(epoch, 1, 8) ~= gen then
  redis.call('DEL', KEYS[1], KEYS[2])
  epoch = false
end
if not epoch then
  return {0, gen, {}, 0, 0}
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
local offset = tonumber(redis.call('HGET', KEYS[1], 'o'))
local count = tonumber(ARGV[4])
local budget = tonumber(ARGV[5])
local after = tonumber(ARGV[3])
local time = redis.call('TIME')
local oldest = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000) - tonumber(ARGV[6])
if ARGV[2] == 'newest' then
  after = 0
  if count >= 0 then
    after = math.max(offset - count, 0)
  end
end
local entries = {}
local expired = 0
-- Nothing after: also keeps an offset too big for a stream ID (Lua prints it as 1e+19) out of XRANGE.
if count == 0 or after >= offset then
  return {offset, epoch, entries, 0, 0}
end
local used = 0
local cursor = '(' .. after .. '-0'
while true do
  local want = 64
  if budget >= 0 then
    if #entries == 0 then
      want = 1
    else
      local average = math.max(used / #entries, 1)
      want = math.max(1, math.min(64, math.floor((budget - used) / average)))
    end
  end
  if count > 0 then
    want = math.min(want, count - #entries)
  end
  if want <= 0 then
    if #redis.call('XRANGE', KEYS[2], cursor, '+', 'COUNT', 1) > 0 then
      return {offset, epoch, entries, 1, expired}
    end
    return {offset, epoch, entries, 0, expired}
  end
  local page = redis.call('XRANGE', KEYS[2], cursor, '+', 'COUNT', want)
  for _, entry in ipairs(page) do
    local fields = entry[2]
    local size = 0
    local stamp = 0
    for i = 1, #fields, 2 do
      if fields[i] == 'p' then
        size = #fields[i + 1]
      elseif fields[i] == 't' then
        stamp = tonumber(fields[i + 1]) or 0
      end
    end
    cursor = '(' .. entry[1]
    if stamp < oldest then
      expired = 1
    else
      if #entries > 0 and budget >= 0 and used + size > budget then
        return {offset, epoch, entries, 1, expired}
      end
      used = used + size
      entries[#entries + 1] = entry
    end
  end
  if #page < want then
    return {offset, epoch, entries, 0, expired}
  end
end
",
    ))
});

/// KEYS: presence, channel, the node's member set. ARGV: session, stored member, event, the
/// member's entry in the node's member set.
pub static JOIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('PUBLISH', KEYS[2], ARGV[3])
return 1
",
    )
});

/// KEYS: presence, channel, the node's member set. ARGV: session, event, the member's entry in
/// the node's member set (removed, so that set never holds more than the node's members).
/// Publishes the event only if the member was there.
pub static LEAVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('SREM', KEYS[3], ARGV[3])
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('PUBLISH', KEYS[2], ARGV[2])
  return 1
end
return 0
",
    )
});

/// KEYS: presence, channel. ARGV: node liveness key prefix, reaped mark TTL ms. Returns the
/// stored members of live nodes; members of dead nodes are removed, a leave is published for
/// each, and the dead node is marked reaped (`<prefix><node>:reaped`), so that if it was only
/// paused it announces its members again when it writes them back.
pub static PRESENCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local all = redis.call('HGETALL', KEYS[1])
local members = {}
local alive = {}
for i = 1, #all, 2 do
  local value = all[i + 1]
  local first = string.find(value, '\n', 1, true)
  local node = string.sub(value, 1, first - 1)
  if alive[node] == nil then
    alive[node] = redis.call('EXISTS', ARGV[1] .. node) == 1
    if not alive[node] then
      redis.call('SET', ARGV[1] .. node .. ':reaped', '1', 'PX', ARGV[2])
    end
  end
  if alive[node] then
    members[#members + 1] = value
  else
    local second = string.find(value, '\n', first + 1, true)
    local user = string.sub(value, first + 1, second - 1)
    redis.call('HDEL', KEYS[1], all[i])
    redis.call('PUBLISH', KEYS[2], '1l' .. all[i] .. '\n' .. user)
  end
end
return members
",
    )
});

/// KEYS: the user's session hash. ARGV: envelope, node liveness prefix, inbox prefix. Publishes
/// the envelope once to the inbox of every live node hosting the user; drops sessions of dead
/// nodes. Returns how many live sessions the user has.
pub static SEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local all = redis.call('HGETALL', KEYS[1])
local sessions = 0
local alive = {}
local sent = {}
for i = 1, #all, 2 do
  local node = all[i + 1]
  if alive[node] == nil then
    alive[node] = redis.call('EXISTS', ARGV[2] .. node) == 1
  end
  if alive[node] then
    sessions = sessions + 1
    if not sent[node] then
      sent[node] = true
      redis.call('PUBLISH', ARGV[3] .. node, ARGV[1])
    end
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return sessions
",
    )
});

/// How many index entries one REAP call handles: a call's cost must not grow with the size of
/// the node, or reaping a big node blocks the shard (and every node's pub/sub pings with it).
pub const REAP_BATCH: usize = 100;

/// Entries of the sets of nodes of earlier versions (rooms, users) one REAP call handles: each
/// costs a walk of the room's presence or the user's sessions.
pub const REAP_LEGACY_BATCH: usize = 20;

/// ARGV: key prefix, node (incarnation), mode, reaped mark TTL ms, batch, legacy batch. Removes
/// one batch of the node's sessions from the registry and members from presence on this shard
/// (publishing a leave for each), popping them from the node's index sets; call it again while it
/// answers 0. When the sets are empty it forgets the node and answers 1. Modes: `forced`, a node
/// leaving on purpose; `dead`, a node whose liveness key expired: answers -1 and does nothing if
/// the key exists (the node heartbeated since the caller looked); `replaced`, an earlier
/// incarnation of a node that started again under the same id, reaped whatever its key says.
/// Unless forced, the node is marked reaped, so that if it was alive after all it announces its
/// members again when it writes them back. Also drains the `:rooms` and `:users` sets that
/// nodes of earlier versions kept.
pub static REAP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local prefix = ARGV[1]
local node = ARGV[2]
local mode = ARGV[3]
local base = prefix .. 'n:' .. node
if mode == 'dead' and redis.call('EXISTS', base) == 1 then
  return -1
end
if mode ~= 'forced' then
  redis.call('SET', base .. ':reaped', '1', 'PX', ARGV[4])
end
local batch = tonumber(ARGV[5])
local legacy = tonumber(ARGV[6])
local owner = node .. '\n'
local function leave(room, session, value)
  local user_end = string.find(value, '\n', #owner + 1, true)
  redis.call('HDEL', prefix .. 'r:' .. room .. ':presence', session)
  redis.call('PUBLISH', prefix .. 'r:' .. room, '1l' .. session .. '\n' .. string.sub(value, #owner + 1, user_end - 1))
end
for _, entry in ipairs(redis.call('SPOP', base .. ':members', batch)) do
  local cut = string.find(entry, '\n', 1, true)
  local session = string.sub(entry, 1, cut - 1)
  local room = string.sub(entry, cut + 1)
  local value = redis.call('HGET', prefix .. 'r:' .. room .. ':presence', session)
  if value and string.sub(value, 1, #owner) == owner then
    leave(room, session, value)
  end
end
for _, entry in ipairs(redis.call('SPOP', base .. ':sessions', batch)) do
  local cut = string.find(entry, '\n', 1, true)
  local session = string.sub(entry, 1, cut - 1)
  local key = prefix .. 'u:' .. string.sub(entry, cut + 1)
  if redis.call('HGET', key, session) == node then
    redis.call('HDEL', key, session)
  end
end
for _, room in ipairs(redis.call('SPOP', base .. ':rooms', legacy)) do
  local all = redis.call('HGETALL', prefix .. 'r:' .. room .. ':presence')
  for i = 1, #all, 2 do
    if string.sub(all[i + 1], 1, #owner) == owner then
      leave(room, all[i], all[i + 1])
    end
  end
end
for _, user in ipairs(redis.call('SPOP', base .. ':users', legacy)) do
  local key = prefix .. 'u:' .. user
  local all = redis.call('HGETALL', key)
  for i = 1, #all, 2 do
    if all[i + 1] == node then
      redis.call('HDEL', key, all[i])
    end
  end
end
for _, set in ipairs({':members', ':sessions', ':rooms', ':users'}) do
  if redis.call('EXISTS', base .. set) == 1 then
    return 0
  end
end
redis.call('DEL', base)
redis.call('SREM', prefix .. 'nodes', node)
if mode == 'forced' then
  redis.call('DEL', base .. ':reaped')
end
return 1
",
    )
});

/// KEYS: presence, channel, the node's member set, the node's reaped mark. ARGV: session, stored
/// member, join event, the member's entry in the node's member set. Writes one of this node's members back (after Redis lost it, or
/// after the node was reaped while alive). Publishes the join only when the member was missing
/// and the node had been reaped, i.e. when its leave had been published.
pub static RESTORE_MEMBER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local added = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[4])
if added == 1 and redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('PUBLISH', KEYS[2], ARGV[3])
  return 1
end
return 0
",
    )
});
