-- KEYS: presence, channel, the node's member set. ARGV: session, event, the member's entry in
-- the node's member set (removed, so that set never holds more than the node's members).
-- Publishes the event only if the member was there.
redis.call('SREM', KEYS[3], ARGV[3])
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('PUBLISH', KEYS[2], ARGV[2])
  return 1
end
return 0
