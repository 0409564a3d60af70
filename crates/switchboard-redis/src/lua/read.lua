-- KEYS: meta, log. ARGV: stream TTL ms, mode (`since` or `newest`), since offset, count
-- (negative: no limit), byte budget (negative: none), history TTL ms. Returns `{offset, epoch,
-- entries, more, expired}` read atomically: entries in offset order after the offset (`newest`:
-- after the room's offset less `count`), stopping at `count` entries or before their payloads
-- pass the budget (at least one entry when there is one); `more` is 1 when it stopped before the
-- last entry. Entries older than the history TTL by Redis's clock are skipped (paging on past
-- them, so a page is never empty while fresh entries follow), and `expired` is then 1. A room
-- without state answers `{0, generation, {}, 0, 0}` and is not created; a room whose epoch another
-- generation of the server made is forgotten (see publish.lua) and answers the same. Entries are
-- fetched a few at a time, sized by what the budget has left, so a log of large payloads is never
-- loaded whole.
-- Runs after generation.lua, which sets `gen`, and entry.lua (`entry_fields`).
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
    local size, stamp = entry_fields(entry[2])
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
