/**
 * Atomic saves of whole artifacts (src/util/atomic.ts): for each kind (PEFT adapter, HF
 * checkpoint with its tokenizer, TF.js model folder, tokenizer file), an OLD artifact is on disk,
 * with a README.md the user put there, and a NEW one is saved to the same path. A crash at every
 * file-system call of the save (k = 0..N, in this process: from call k on nothing reaches the
 * disk, which is the disk a kill at that call leaves) and `kill -9` of a real writer process (at
 * the one call after which the folder is briefly missing, and at a random time) must each leave
 * what the package's own loader reads as exactly OLD or exactly NEW, every file byte for byte,
 * and the README kept. Folders are opened the way every loader opens them (openArtifactFolder),
 * which finishes a swap that a kill interrupted.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import { cp, lstat, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { CharTokenizer } from '../../src/data/tokenizer.js';
import { readTokenizer } from '../../src/data/tokenizer_file.js';
import { fileIO } from '../../src/io/file_io_handler.js';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { loadPeftAdapter } from '../../src/io/peft_files.js';
import { writeArtifactFolder, writeFileAtomically } from '../../src/util/atomic.js';
import { FileError, openArtifactFolder } from '../../src/util/files.js';
import {
  ARTIFACT_KINDS, peftBaseModel, prepareSave, WRITER_ALPHA, writerTokenizer, type ArtifactKind,
} from '../helpers/atomic_writer.js';
import { installCrashSwitch } from '../helpers/fs_crash_switch.js';
import { cleanup, tempDir } from './checkpoint_helpers.js';

type Outcome = 'old' | 'new';

/** Files that differ between the old and the new artifact of each kind (atomic_writer.ts). */
const CHANGED_FILES: Record<ArtifactKind, string[]> = {
  peft: ['adapter_config.json', 'adapter_model.safetensors'],
  hf: ['model.safetensors', 'tokenizer.json'],
  tfjs: ['weights.bin'],
  tokenizer: ['tokenizer.json'],
};
type Snapshot = Record<string, string>;

/**
 * Every file under `dir` (subfolders too) with its bytes, except the temporary file a killed
 * single-file save leaves beside its target ('.tokenizer.json.tmp-…'): not part of any artifact.
 */
async function snapshot(dir: string, prefix = '', files: Snapshot = {}): Promise<Snapshot> {
  const entries = (await readdir(dir, { withFileTypes: true })).filter(e => !/^\..*\.tmp-/.test(e.name));
  for (const entry of entries.sort((a, b) => a.name.localeCompare(b.name))) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) await snapshot(path, `${prefix}${entry.name}/`, files);
    else files[`${prefix}${entry.name}`] = (await readFile(path)).toString('base64');
  }
  return files;
}

const exists = (path: string) => lstat(path).then(() => true, () => false);

/**
 * What is at `dir` after a crash: opened as loaders do, equal to OLD or NEW file by file, and
 * loaded by the package's loader as that artifact. Returns which one it is.
 */
async function checkArtifact(kind: ArtifactKind, dir: string, old: Snapshot, neu: Snapshot, where: string): Promise<Outcome> {
  await openArtifactFolder(dir, where);
  const found = JSON.stringify(await snapshot(dir));
  const outcome: Outcome | null = found === JSON.stringify(old) ? 'old' : found === JSON.stringify(neu) ? 'new' : null;
  if (outcome === null) {
    const files = Object.keys(JSON.parse(found) as Snapshot);
    expect.fail(`${where}: the folder is neither the old nor the new artifact (files: ${files.join(', ')})`);
  }
  if (kind === 'peft') {
    const base = await peftBaseModel();
    try {
      const loaded = await loadPeftAdapter(base, dir);
      expect(loaded.alpha, where).to.equal(WRITER_ALPHA[outcome]);
    } finally {
      base.dispose();
    }
  } else if (kind === 'hf') {
    (await loadHFCheckpoint(dir)).dispose();
    expect((await readTokenizer(dir) as CharTokenizer).toJSON(), where).to.deep.equal(writerTokenizer(outcome).toJSON());
  } else if (kind === 'tfjs') {
    (await tfl.loadLayersModel(fileIO(dir))).dispose();
  } else {
    expect((await readTokenizer(dir) as CharTokenizer).toJSON(), where).to.deep.equal(writerTokenizer(outcome).toJSON());
  }
  return outcome;
}

/** Runs the writer process (spec/helpers/atomic_writer.ts); `kill` decides when it is SIGKILLed. */
function runWriter(kind: ArtifactKind, dir: string, kill: { atCall: number } | { afterMs: number }):
    Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }> {
  const env = { ...process.env };
  delete env['KILL_AT_FS_CALL'];
  if ('atCall' in kill) env['KILL_AT_FS_CALL'] = String(kill.atCall);
  const child = spawn(process.execPath, ['--import', 'tsx', '--import', './spec/helpers/kill_at_fs_call.ts',
    'spec/helpers/atomic_writer.ts', kind, dir, 'new'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => { stderr += String(d); });
  child.stdout.on('data', (d: Buffer) => {
    if ('afterMs' in kill && String(d).includes('saving')) setTimeout(() => child.kill('SIGKILL'), kill.afterMs);
  });
  return new Promise(done => child.on('close', (code, signal) => done({ code, signal, stderr })));
}

describe('io/atomic saves: a crash at any instant leaves the old artifact or the new one', () => {
  let root: string;
  before(async () => { root = await tempDir('atomic-save-'); });
  after(cleanup);

  for (const kind of ARTIFACT_KINDS) {
    it(`${kind}: a crash at every file-system call of the save, and kill -9 of a writer process`, async function () {
      this.timeout(120_000);
      const tensors = tf.memory().numTensors;
      const [oldSave, newSave] = [await prepareSave(kind, 'old'), await prepareSave(kind, 'new')];
      const base = join(root, kind, 'base', 'artifact');
      await oldSave.save(base);
      await writeFile(join(base, 'README.md'), 'notes the user keeps here\n');
      const old = await snapshot(base);
      const copyOfOld = async (name: string) => {
        const dir = join(root, kind, name, 'artifact');
        await cp(base, dir, { recursive: true });
        return dir;
      };

      const { crashSwitch, uninstall } = installCrashSwitch();
      const outcomes: Outcome[] = [];
      let neu: Snapshot;
      let gap = -1;  // the first call before which the folder is missing until a reader finishes the swap
      try {
        // the whole save, counting its calls
        const complete = await copyOfOld('complete');
        crashSwitch.armed = true;
        await newSave.save(complete);
        crashSwitch.armed = false;
        const calls = crashSwitch.calls;
        neu = await snapshot(complete);
        expect(neu['README.md'], 'the README survives the save').to.equal(old['README.md']);
        for (const name of CHANGED_FILES[kind]) expect(neu[name], `the new ${name} differs from the old one`).to.not.equal(old[name]);
        expect(await readdir(join(root, kind, 'complete')), 'nothing left beside the artifact').to.deep.equal(['artifact']);

        for (let k = 0; k <= calls; k++) {
          const dir = await copyOfOld(`k${k}`);
          Object.assign(crashSwitch, { calls: 0, crashAt: k, crashed: false, armed: true });
          const error = await newSave.save(dir).then(() => null, (e: Error) => e);
          crashSwitch.armed = false;
          expect(crashSwitch.crashed, `k ${k}: the save crashed`).to.equal(k < calls);
          if (k < calls) expect(error?.message, `k ${k}`).to.match(/simulated crash/);
          else expect(error, `k ${k}`).to.equal(null);
          if (gap < 0 && !(await exists(dir))) gap = k;
          outcomes.push(await checkArtifact(kind, dir, old, neu, `${kind}, crash at call ${k} of ${calls}`));
        }
      } finally {
        crashSwitch.armed = false;
        uninstall();
        oldSave.dispose();
        newSave.dispose();
      }
      expect(outcomes, 'both outcomes occur over the calls').to.include('old').and.include('new');
      expect(outcomes.lastIndexOf('old') < outcomes.indexOf('new'), `old until one call, new after it: ${outcomes.join(' ')}`)
          .to.equal(true);
      if (kind !== 'tokenizer') expect(gap, 'the swap leaves the folder missing for one call').to.be.above(0);

      // real processes, SIGKILLed: at the call after which the folder is missing (the reader finishes
      // the swap: NEW), before the last call (a single file: OLD), and at a random time
      const killAt = kind === 'tokenizer' ? outcomes.length - 2 : gap;
      const afterMs = Math.floor(Math.random() * 40);
      const [deterministic, random] = await Promise.all([
        copyOfOld('kill-at-call').then(dir => runWriter(kind, dir, { atCall: killAt })),
        copyOfOld('kill-random').then(dir => runWriter(kind, dir, { afterMs })),
      ]);
      expect(deterministic.signal, deterministic.stderr).to.equal('SIGKILL');
      const killed = await checkArtifact(kind, join(root, kind, 'kill-at-call', 'artifact'), old, neu,
          `${kind}, writer killed at call ${killAt}`);
      expect(killed).to.equal(outcomes[killAt]);
      expect(random.signal === 'SIGKILL' || random.code === 0, random.stderr).to.equal(true);
      await checkArtifact(kind, join(root, kind, 'kill-random', 'artifact'), old, neu, `${kind}, writer killed after ${afterMs} ms`);
      expect(tf.memory().numTensors).to.equal(tensors);
    });
  }

  it('a PEFT save replaces the old adapter as a whole (adapter_model.bin goes) and keeps the other files', async () => {
    const dir = join(root, 'peft-owns', 'adapter');
    await cp(join('spec', 'fixtures', 'hf', 'mixtral', 'adapter'), dir, { recursive: true });
    await writeFile(join(dir, 'adapter_model.bin'), 'an older torch adapter');
    await writeFile(join(dir, 'README.md'), 'mine');
    const { save, dispose } = await prepareSave('peft', 'new');
    try {
      await save(dir);
    } finally {
      dispose();
    }
    expect((await readdir(dir)).sort()).to.deep.equal(['README.md', 'adapter_config.json', 'adapter_model.safetensors']);
    expect(JSON.parse(await readFile(join(dir, 'adapter_config.json'), 'utf8')).lora_alpha).to.equal(WRITER_ALPHA.new);
  });

  it('a save under /proc fails at once with the folder it could not create (a recursive mkdir never returns there)', async () => {
    let error: unknown;
    await writeArtifactFolder('/proc/tfjs-moe-lora/adapter', async () => {}, { what: '`savePeftAdapter()`' }).catch(e => { error = e; });
    expect(error).to.be.instanceOf(FileError);
    expect((error as Error).message).to.equal("`savePeftAdapter()`: cannot create the folder '/proc/tfjs-moe-lora': ENOENT");
    error = undefined;
    await writeFileAtomically('/proc/tfjs-moe-lora/tokenizer.json', '{}', '`writeTokenizer()`').catch(e => { error = e; });
    expect((error as Error).message).to.equal("`writeTokenizer()`: cannot create the folder '/proc/tfjs-moe-lora': ENOENT");
  });

  it('a save whose write throws leaves the old folder untouched and nothing beside it', async () => {
    const target = join(root, 'throws', 'artifact');
    await writeArtifactFolder(target, async dir => { await writeFile(join(dir, 'model.json'), 'old'); });
    await writeFile(join(target, 'README.md'), 'mine');
    const before = await snapshot(target);
    let error: unknown;
    await writeArtifactFolder(target, async dir => {
      await writeFile(join(dir, 'model.json'), 'new');
      throw new Error('the write failed');
    }).catch(e => { error = e; });
    expect((error as Error).message).to.equal('the write failed');
    expect(await snapshot(target)).to.deep.equal(before);
    expect(await readdir(join(root, 'throws'))).to.deep.equal(['artifact']);
  });
});
