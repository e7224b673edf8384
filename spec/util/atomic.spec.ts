import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import { mkdir, mkdtemp, readdir, readFile, readlink, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeArtifactFolder, writeFileAtomically } from '../../src/util/atomic.js';
import { FileError } from '../../src/util/files.js';

const read = (path: string) => readFile(path, 'utf8');

describe('util/atomic', () => {
  let root: string;
  beforeEach(async () => { root = await mkdtemp(join(tmpdir(), 'atomic-spec-')); });
  afterEach(async () => { await rm(root, { recursive: true, force: true }); });

  it('creates a folder artifact and its parents', async () => {
    const target = join(root, 'a', 'b', 'adapter');
    await writeArtifactFolder(target, async dir => {
      await writeFile(join(dir, 'one.json'), '1');
      await writeFile(join(dir, 'two.bin'), '2');
    });
    expect((await readdir(target)).sort()).to.deep.equal(['one.json', 'two.bin']);
    expect(await readdir(join(root, 'a', 'b'))).to.deep.equal(['adapter']);  // no temporary folder left
  });

  it('replaces the artifact whole, keeps the user\'s files and drops stale owned ones', async () => {
    const target = join(root, 'ckpt');
    await mkdir(target);
    await writeFile(join(target, 'config.json'), 'old');
    await writeFile(join(target, 'model-00001-of-00002.safetensors'), 'old shard');
    await writeFile(join(target, 'README.md'), 'mine');
    await writeArtifactFolder(target, async dir => {
      await writeFile(join(dir, 'config.json'), 'new');
      await writeFile(join(dir, 'model.safetensors'), 'new weights');
    }, { owns: name => name.endsWith('.safetensors') });
    expect((await readdir(target)).sort()).to.deep.equal(['README.md', 'config.json', 'model.safetensors']);
    expect(await read(join(target, 'config.json'))).to.equal('new');
    expect(await read(join(target, 'README.md'))).to.equal('mine');
    expect(await readdir(root)).to.deep.equal(['ckpt']);
  });

  it('carries the user\'s folders over file by file as hard links: the same inodes, no bytes copied, symlinks kept', async () => {
    const target = join(root, 'run');
    await mkdir(join(target, 'checkpoint-2', 'nested'), { recursive: true });
    await writeFile(join(target, 'checkpoint-2', 'model.safetensors'), 'weights of step 2');
    await writeFile(join(target, 'checkpoint-2', 'nested', 'state.json'), '{}');
    await symlink('model.safetensors', join(target, 'checkpoint-2', 'latest'));
    const inode = (await stat(join(target, 'checkpoint-2', 'model.safetensors'))).ino;
    await writeArtifactFolder(target, async dir => { await writeFile(join(dir, 'model.safetensors'), 'final'); });
    expect((await readdir(target)).sort()).to.deep.equal(['checkpoint-2', 'model.safetensors']);
    expect((await stat(join(target, 'checkpoint-2', 'model.safetensors'))).ino, 'a link, not a copy').to.equal(inode);
    expect(await read(join(target, 'checkpoint-2', 'nested', 'state.json'))).to.equal('{}');
    expect(await readlink(join(target, 'checkpoint-2', 'latest'))).to.equal('model.safetensors');
    expect(await read(join(target, 'model.safetensors'))).to.equal('final');
  });

  it('leaves the old artifact untouched and no temporary folder when writing fails', async () => {
    const target = join(root, 'adapter');
    await mkdir(target);
    await writeFile(join(target, 'adapter_config.json'), 'old');
    const failure = new Error('disk full');
    let err: unknown;
    try {
      await writeArtifactFolder(target, async dir => {
        await writeFile(join(dir, 'adapter_config.json'), 'new');
        throw failure;
      });
    } catch (e) { err = e; }
    expect(err).to.equal(failure);
    expect(await read(join(target, 'adapter_config.json'))).to.equal('old');
    expect(await readdir(root)).to.deep.equal(['adapter']);
  });

  it('refuses to replace a file with a folder or a folder with a file', async () => {
    await writeFile(join(root, 'x'), 'a file');
    let err: unknown;
    try { await writeArtifactFolder(join(root, 'x'), async () => {}, { what: '`saveX()`' }); } catch (e) { err = e; }
    expect(err).to.be.instanceOf(FileError);
    expect((err as Error).message).to.equal(`\`saveX()\`: '${join(root, 'x')}' exists and is not a folder; it is not replaced`);
    await mkdir(join(root, 'tokenizer.json'));
    err = undefined;
    try { await writeFileAtomically(join(root, 'tokenizer.json'), '{}'); } catch (e) { err = e; }
    expect((err as Error).message).to.equal(`save: '${join(root, 'tokenizer.json')}' exists and is not a regular file; it is not replaced`);
  });

  it('removes what saves killed earlier left beside the target, not what a running one uses', async () => {
    const dead = spawnSync(process.execPath, ['-e', '0']).pid!;  // a process that has exited
    const target = join(root, 'adapter');
    await mkdir(join(root, `.adapter.tmp-${dead}-abc123`));
    await writeFile(join(root, `.tokenizer.json.tmp-${dead}-x1`), 'half');
    await mkdir(join(root, `.adapter.tmp-${process.pid}-live00`));
    await writeArtifactFolder(target, async dir => { await writeFile(join(dir, 'a.json'), '1'); });
    await writeFileAtomically(join(root, 'tokenizer.json'), '{}');
    expect((await readdir(root)).sort()).to.deep.equal([`.adapter.tmp-${process.pid}-live00`, 'adapter', 'tokenizer.json']);
  });

  it('writes a single file through a rename, leaving nothing else', async () => {
    await writeFileAtomically(join(root, 'sub', 'tokenizer.json'), '{"a":1}');
    await writeFileAtomically(join(root, 'sub', 'tokenizer.json'), '{"a":2}');
    expect(await read(join(root, 'sub', 'tokenizer.json'))).to.equal('{"a":2}');
    expect(await readdir(join(root, 'sub'))).to.deep.equal(['tokenizer.json']);
  });
});
