-- KEYS: the user's inbox meta, inbox log. ARGV: after, count, byte budget, inbox TTL ms, 8 random
-- hex digits. Returns `{seq, acked, epoch, entries, more}` read atomically: the log's entries
-- with seq above both `after` and acked, in seq order, stopping at `count` entries or before
-- their payloads pass the budget (at least one entry when there is one); `more` is 1 when it
-- stopped before the last entry. Entries older than the TTL by Redis's clock are skipped. An
-- inbox without state answers `{0, 0, generation and the digits, {}, 0}` and is not created; one
-- another generation of the server made is forgotten (see inbox_send.lua) and answers the same.
-- Reading refreshes no TTL: only sends and acks keep an inbox. Entries are fetched a few at a
-- time, sized by what the budget has left, so a log of large payloads is never loaded whole.
-- Runs after generation.lua, which sets `gen`, and entry.lua (`entry_fields`).
local epoch = redis.call('HGET', KEYS[1], 'e')
if epoch and string.sub(epoch, 1, 8) ~= gen then
  redis.call('DEL', KEYS[1], KEYS[2])
  epoch = false
end
if not epoch then
  return {0, 0, gen .. ARGV[5], {}, 0}
end
local seq = tonumber(redis.call('HGET', KEYS[1], 's'))
local acked = tonumber(redis.call('HGET', KEYS[1], 'a'))
local after = math.max(tonumber(ARGV[1]), acked)
local count = tonumber(ARGV[2])
local budget = tonumber(ARGV[3])
local time = redis.call('TIME')
local oldest = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000) - tonumber(ARGV[4])
local entries = {}
-- Nothing after: also keeps a seq too big for a stream ID (Lua prints it as 1e+19) out of XRANGE.
if count == 0 or after >= seq then
  return {seq, acked, epoch, entries, 0}
end
local used = 0
local cursor = '(' .. after .. '-0'
while true do
  -- Sized by what the budget has left (one entry to start with), and at most one more than the
  -- count still needs, to tell whether more follows.
  local want = 1
  if #entries > 0 then
    local average = math.max(used / #entries, 1)
    want = math.max(1, math.min(16, math.floor((budget - used) / average)))
  end
  want = math.min(want, count - #entries + 1)
  local page = redis.call('XRANGE', KEYS[2], cursor, '+', 'COUNT', want)
  for _, entry in ipairs(page) do
    local size, stamp = entry_fields(entry[2])
    cursor = '(' .. entry[1]
    if stamp >= oldest then
      if #entries == count or (#entries > 0 and used + size > budget) then
        return {seq, acked, epoch, entries, 1}
      end
      used = used + size
      entries[#entries + 1] = entry
    end
  end
  if #page < want then
    return {seq, acked, epoch, entries, 0}
  end
end
