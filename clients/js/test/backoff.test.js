// Unit tests of the reconnect schedule, with an injected random source.

import assert from "node:assert/strict";
import { test } from "node:test";

import { backoffDelay, shouldReconnect } from "../switchboard.js";

const lowest = () => 0;
const highest = () => 0.999999;
const half = () => 0.5;

test("full jitter spans zero to the cap, which doubles from initialDelayMs", () => {
  const options = { initialDelayMs: 100, maxDelayMs: 10_000 };
  const caps = [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000];
  caps.forEach((cap, attempt) => {
    assert.equal(backoffDelay(attempt, 1006, options, lowest), 0);
    assert.equal(backoffDelay(attempt, 1006, options, half), cap / 2);
    const top = backoffDelay(attempt, 1006, options, highest);
    assert.ok(top < cap && top > cap * 0.999, `attempt ${attempt}: ${top}`);
  });
});

test("the cap never exceeds maxDelayMs, even for huge attempts or odd multipliers", () => {
  for (const multiplier of [2, 0, 0.5, -3, Number.NaN, Infinity, 1e300]) {
    const options = { initialDelayMs: 100, maxDelayMs: 3000, multiplier };
    for (const attempt of [0, 1, 10, 5000, Number.MAX_SAFE_INTEGER]) {
      const top = backoffDelay(attempt, 1006, options, highest);
      assert.ok(top >= 0 && top <= 3000, `${multiplier} ${attempt}: ${top}`);
      // Multipliers below 1 count as 1: the cap never shrinks below the first one.
      assert.ok(top >= 100 * 0.999, `${multiplier} ${attempt}: ${top}`);
    }
  }
});

test("defaults: 500 ms first cap, 10 s maximum", () => {
  assert.equal(backoffDelay(0, 1006, {}, half), 250);
  assert.equal(backoffDelay(1, 1011, undefined, half), 500);
  assert.equal(backoffDelay(30, 1006, {}, half), 5000);
});

test("after 1001 the schedule starts from the smaller drainingDelayMs", () => {
  const options = { initialDelayMs: 500, drainingDelayMs: 100, maxDelayMs: 10_000 };
  for (let attempt = 0; attempt < 5; attempt++) {
    const draining = backoffDelay(attempt, 1001, options, highest);
    const lost = backoffDelay(attempt, 1006, options, highest);
    assert.ok(draining <= 100 * 2 ** attempt, `attempt ${attempt}: ${draining}`);
    assert.ok(draining < lost, `attempt ${attempt}: ${draining} vs ${lost}`);
  }
  assert.equal(backoffDelay(20, 1001, options, half), 5000);
});

test("after 1013 the delay is at least overloadedDelayMs, jittered above it", () => {
  const options = { initialDelayMs: 100, maxDelayMs: 10_000, overloadedDelayMs: 1000 };
  for (let attempt = 0; attempt < 10; attempt++) {
    const least = backoffDelay(attempt, 1013, options, lowest);
    const most = backoffDelay(attempt, 1013, options, highest);
    assert.equal(least, 1000);
    const cap = Math.max(1000, Math.min(10_000, 100 * 2 ** attempt));
    assert.ok(most <= cap, `attempt ${attempt}: ${most}`);
    assert.ok(most > backoffDelay(attempt, 1006, options, highest) || cap === 10_000);
  }
  // The floor never goes above the maximum delay.
  const small = { ...options, maxDelayMs: 300 };
  assert.equal(backoffDelay(0, 1013, small, lowest), 300);
  assert.equal(backoffDelay(5, 1013, small, highest), 300);
});

test("no reconnect after 1008 (policy), 1002 or 1007; every other close is retried", () => {
  for (const code of [1002, 1007, 1008]) assert.equal(shouldReconnect(code), false, `${code}`);
  for (const code of [1000, 1001, 1006, 1009, 1011, 1013, 3000, 4999]) {
    assert.equal(shouldReconnect(code), true, `${code}`);
  }
});
