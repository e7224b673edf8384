/**
 * limitHeapGrowthForTraining (src/cli/heap_growth.ts): the flag it sets and when a user's own wins; and
 * in child processes that V8 takes it at run time: with it, a heap that promotes garbage steadily gets
 * mark-compacts several times as often and stays far smaller than with a user's --heap-growing-percent=300.
 */
import { expect } from 'chai';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { limitHeapGrowthForTraining, TRAINING_HEAP_GROWING_PERCENT } from '../../src/cli/heap_growth.js';

const run = promisify(execFile);

/** The churn child's JSON line, node given `nodeFlags`. */
async function churn(nodeFlags: string[]): Promise<{ set: boolean; majors: number; maxUsedMB: number }> {
  const { stdout } = await run(process.execPath, [...nodeFlags, '--import', 'tsx', 'spec/cli/heap_growth_churn.ts'],
      { env: { ...process.env, NODE_OPTIONS: '' }, maxBuffer: 1 << 20 });
  return JSON.parse(stdout.trim().split('\n').at(-1)!) as { set: boolean; majors: number; maxUsedMB: number };
}

describe('cli: limitHeapGrowthForTraining', () => {
  it('sets --heap-growing-percent=25 unless node\'s flags or NODE_OPTIONS give one (either spelling)', () => {
    const calls: string[] = [];
    const set = (flags: string) => { calls.push(flags); };
    expect(TRAINING_HEAP_GROWING_PERCENT).to.equal(25);
    expect(limitHeapGrowthForTraining({ execArgv: [], nodeOptions: undefined }, set)).to.equal(true);
    expect(limitHeapGrowthForTraining({ execArgv: ['--max-old-space-size=8192'], nodeOptions: '--enable-source-maps --max-semi-space-size=32' }, set))
        .to.equal(true);
    expect(calls).to.deep.equal(['--heap-growing-percent=25', '--heap-growing-percent=25']);
    for (const env of [{ execArgv: ['--heap-growing-percent=50'], nodeOptions: undefined }, { execArgv: ['--heap_growing_percent=0'], nodeOptions: '' },
      { execArgv: [], nodeOptions: '--max-old-space-size=4096  --heap-growing-percent=10' }]) {
      expect(limitHeapGrowthForTraining(env, set), JSON.stringify(env)).to.equal(false);
    }
    expect(calls).to.have.length(2);
  });

  it('takes effect at run time: more mark-compacts and a smaller heap than a user\'s --heap-growing-percent=300, which it leaves', async () => {
    const limited = await churn([]);
    const users = await churn(['--heap-growing-percent=300']);
    expect(limited.set).to.equal(true);
    expect(users.set).to.equal(false);
    expect(limited.majors, JSON.stringify({ limited, users })).to.be.at.least(3 * Math.max(1, users.majors));
    expect(limited.maxUsedMB, JSON.stringify({ limited, users })).to.be.below(0.7 * users.maxUsedMB);
  });
});
