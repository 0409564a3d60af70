-- Defines `deliver(sessions, envelope, alive_prefix, inbox_prefix)`: publishes the envelope once
-- to the inbox channel of every live node hosting the user whose session hash is `sessions`;
-- drops sessions of dead nodes. Returns how many live sessions the user has. Shared by send.lua
-- and inbox_send.lua, so a persisted send reaches exactly the sessions a plain one does.
local function deliver(sessions_key, envelope, alive_prefix, inbox_prefix)
  local all = redis.call('HGETALL', sessions_key)
  local sessions = 0
  local alive = {}
  local sent = {}
  for i = 1, #all, 2 do
    local node = all[i + 1]
    if alive[node] == nil then
      alive[node] = redis.call('EXISTS', alive_prefix .. node) == 1
    end
    if alive[node] then
      sessions = sessions + 1
      if not sent[node] then
        sent[node] = true
        redis.call('PUBLISH', inbox_prefix .. node, envelope)
      end
    else
      redis.call('HDEL', sessions_key, all[i])
    end
  end
  return sessions
end
