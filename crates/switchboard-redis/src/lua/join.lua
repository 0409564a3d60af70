-- KEYS: presence, channel, the node's member set. ARGV: session, stored member, event, the
-- member's entry in the node's member set.
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('PUBLISH', KEYS[2], ARGV[3])
return 1
