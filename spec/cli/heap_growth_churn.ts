/**
 * A child process of spec/cli/heap_growth.spec.ts: calls limitHeapGrowthForTraining, then keeps a live base of
 * objects and allocates objects that live long enough to be promoted (as a training step's bookkeeping does);
 * prints one JSON line: whether the helper set the flag, the mark-compacts and the most heap in use.
 */
import { getHeapStatistics } from 'node:v8';
import { constants, PerformanceObserver } from 'node:perf_hooks';
import { limitHeapGrowthForTraining } from '../../src/cli/heap_growth.js';

const set = limitHeapGrowthForTraining();
const base = Array.from({ length: 200 }, () => Array.from({ length: 10000 }, (_, i) => ({ i })));
let majors = 0;
new PerformanceObserver(list => {
  for (const e of list.getEntries()) if ((e as { detail?: { kind?: number } }).detail?.kind === constants.NODE_PERFORMANCE_GC_MAJOR) majors++;
}).observe({ entryTypes: ['gc'] });
let kept: object[][] = [];
let maxUsed = 0;
for (let step = 0; step < 150; step++) {
  for (let k = 0; k < 50; k++) kept.push(Array.from({ length: 2000 }, (_, i) => ({ i, step })));
  if (kept.length > 300) kept = kept.slice(-300);
  maxUsed = Math.max(maxUsed, getHeapStatistics().used_heap_size);
  await new Promise(resolve => setImmediate(resolve));
}
console.log(JSON.stringify({ set, majors, maxUsedMB: maxUsed / 2 ** 20, live: base.length + kept.length }));
