-- KEYS: the user's inbox meta, inbox log, session hash, and (keyed sends only) the idempotency
-- key. ARGV: direct envelope whose last 8 bytes are the seq's placeholder, stored payload, inbox
-- size, inbox TTL ms, idempotency window ms, 8 random hex digits, node liveness prefix, inbox
-- prefix. A persisted send in one round trip:
-- 1. A key used within the window answers its first result, `{sessions, seq, epoch, 1, 0}`,
--    and nothing else happens.
-- 2. The next seq of the inbox (started over with a new epoch when another generation of the
--    server made it, as rooms are in publish.lua); the oldest entries beyond the size are
--    trimmed, counting those not expired as dropped; the entry is appended (id `<seq>-0`,
--    stamped with Redis's clock) and both keys live for the TTL from now.
-- 3. The envelope, its seq written in, is delivered as send.lua does.
-- 4. The key, if any, remembers `sessions:seq:epoch` for the window.
-- Returns `{sessions, seq, epoch, 0, dropped}`.
-- Runs after generation.lua (`gen`), deliver.lua (`deliver`) and entry.lua (`entry_fields`).
if KEYS[4] then
  local first = redis.call('GET', KEYS[4])
  if first then
    local sessions, seq, epoch = string.match(first, '^(%d+):(%d+):(.*)$')
    return {tonumber(sessions), tonumber(seq), epoch, 1, 0}
  end
end
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch or string.sub(epoch, 1, 8) ~= gen then
  epoch = gen .. ARGV[6]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 's', 0, 'a', 0)
end
local seq = redis.call('HINCRBY', KEYS[1], 's', 1)
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local oldest = now - tonumber(ARGV[4])
local size = tonumber(ARGV[3])
local keep = math.max(size - 1, 0)
local over = redis.call('XLEN', KEYS[2]) - keep
local dropped = 0
if over > 0 then
  for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', over)) do
    local _, stamp = entry_fields(entry[2])
    if stamp >= oldest then
      dropped = dropped + 1
    end
  end
  redis.call('XTRIM', KEYS[2], 'MAXLEN', keep)
end
if size > 0 then
  redis.call('XADD', KEYS[2], seq .. '-0', 'p', ARGV[2], 't', string.format('%.0f', now))
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
-- The seq as a big-endian u64, over the placeholder that ends the envelope's MessagePack.
local digits = {}
local rest = seq
for i = 8, 1, -1 do
  digits[i] = string.char(rest % 256)
  rest = math.floor(rest / 256)
end
local envelope = string.sub(ARGV[1], 1, -9) .. table.concat(digits)
local sessions = deliver(KEYS[3], envelope, ARGV[7], ARGV[8])
if KEYS[4] then
  redis.call('SET', KEYS[4], sessions .. ':' .. seq .. ':' .. epoch, 'PX', ARGV[5])
end
return {sessions, seq, epoch, 0, dropped}
