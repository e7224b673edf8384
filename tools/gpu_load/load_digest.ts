/**
 * A digest of every weight a load gives (FNV-1a over each weight's bytes, with its dtype and shape),
 * one JSON object on stdout: two loads of one checkpoint that give the same digests hold the same
 * bits. For checking a loader change at real size on each backend against another commit's load:
 *   npx tsx tools/gpu_load/load_digest.ts DIR BACKEND [expertDtype] [denseDtype]
 * (EGL_PLATFORM=surfaceless for Mesa's webgpu; write DIR with writeRandomBF16Checkpoint).
 */
import { selectBenchBackend } from '../../src/bench/backend.js';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import type { LoadHFCheckpointOptions } from '../../src/io/hf_checkpoint_core.js';

const [dir, backend, expertDtype = 'stored', denseDtype = 'stored'] = process.argv.slice(2);
const release = await selectBenchBackend(backend);
try {
  const model = await loadHFCheckpoint(dir, { expertDtype, denseDtype } as LoadHFCheckpointOptions);
  const digests: Record<string, string> = {};
  for (const w of model.weights) {
    const t = w.read();
    const data = await t.data();
    const words = new Uint32Array(data.buffer, data.byteOffset, data.byteLength / 4);
    let h = 0x811c9dc5;
    for (let i = 0; i < words.length; i++) {
      h = Math.imul(h ^ words[i], 0x01000193);
      h ^= h >>> 15;
    }
    digests[w.name] = `${t.dtype} [${t.shape.join(',')}] ${(h >>> 0).toString(16)}`;
  }
  process.stdout.write(`${JSON.stringify(digests)}\n`);
} finally {
  await release();
}
