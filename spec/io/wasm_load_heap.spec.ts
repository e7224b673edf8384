/**
 * The wasm heap while a checkpoint loads: the loader writes each weight into its variable's own
 * buffer (writeVariable / readIntoVariable in src/io/device_tensor.ts), so the heap, which never
 * shrinks, ends near the tensors it holds. Before, each assign left the old buffer as a hole and a
 * 171 MB int4 load grew the heap to 302 MB (a 1.05B-parameter one to 2287 MB for 1463 MB).
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { writeVariable } from '../../src/io/device_tensor.js';

const TOOL = join(dirname(fileURLToPath(import.meta.url)), '../../bench/wasm_load_heap.ts');

interface HeapReport { heapBeforeMB: number; heapAfterLoadMB: number; tensorsMB: number; largestMallocMB: number }

/** bench/wasm_load_heap.ts in a child process of its own (a fresh heap): its last line. */
async function loadInFreshHeap(args: string[]): Promise<HeapReport> {
  const child = spawn(process.execPath, [...process.execArgv, TOOL, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => { stdout += d.toString(); });
  child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
  const code = await new Promise<number | null>(resolve => child.on('close', resolve));
  expect(code, stderr).to.equal(0);
  return JSON.parse(stdout.trim().split('\n').at(-1)!) as HeapReport;
}

describe('io: the wasm heap while a checkpoint loads', function () {
  this.timeout(120_000);

  it('171 MB of int4 + float32 weights: the heap ends within what it had + the tensors + the largest allocation', async () => {
    const r = await loadInFreshHeap(['2', 'int4', 'narrow']);
    const bound = r.heapBeforeMB + r.tensorsMB + r.largestMallocMB;
    console.log(`# wasm heap ${r.heapBeforeMB} → ${r.heapAfterLoadMB} MB for ${r.tensorsMB} MB of tensors (bound ${bound.toFixed(1)})`);
    expect(r.tensorsMB).to.be.closeTo(171.1, 0.1);   // the checkpoint the bound was measured on
    expect(r.heapAfterLoadMB).to.be.at.most(bound);
  });

  it('writeVariable writes the values, and never through a buffer the variable shares with another tensor', () => {
    const before = tf.memory().numTensors;
    const zeros = tf.zeros([2, 3]);
    const owned = new tfl.LayerVariable(zeros, 'float32', 'owned', false);
    zeros.dispose();   // the variable alone holds its buffer: on wasm written in place
    const shared = tf.tensor2d([[7, 7, 7], [7, 7, 7]]);
    const sharing = new tfl.LayerVariable(shared, 'float32', 'sharing', false);
    const values = tf.tensor2d([[1, 2, 3], [4, 5, 6]]);
    const ownBuffer = owned.read().dataId;
    writeVariable(owned, values);
    // on wasm into the buffer it had (no new allocation, no hole); elsewhere assigned as variable.write does
    expect(owned.read().dataId === ownBuffer).to.equal(tf.getBackend() === 'wasm');
    writeVariable(sharing, values);
    expect(Array.from(owned.read().dataSync())).to.deep.equal([1, 2, 3, 4, 5, 6]);
    expect(Array.from(sharing.read().dataSync())).to.deep.equal([1, 2, 3, 4, 5, 6]);
    values.dispose();   // the caller's: the variables keep their values
    expect(Array.from(owned.read().dataSync())).to.deep.equal([1, 2, 3, 4, 5, 6]);
    expect(Array.from(shared.dataSync())).to.deep.equal([7, 7, 7, 7, 7, 7]);
    shared.dispose();
    owned.dispose();
    sharing.dispose();
    expect(tf.memory().numTensors).to.equal(before);
  });
});
