import { expect } from 'chai';
import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MoELoraError } from '../../src/errors.js';
import {
  confinedPath, FileError, openArtifactFolder, openRegularFile, readJSONFile, readRegularFile,
} from '../../src/util/files.js';
import { rejection } from '../helpers/rejection.js';

/** Fails instead of hanging when `p` blocks (a FIFO opened for a blocking read never returns). */
function within<T>(ms: number, p: Promise<T>): Promise<T> {
  return Promise.race([p, new Promise<T>((_, reject) => setTimeout(() => reject(new Error(`blocked for ${ms} ms`)), ms))]);
}

describe('util/files', () => {
  let root: string;
  let dir: string;
  beforeEach(async () => {
    root = await mkdtemp(join(tmpdir(), 'files-spec-'));
    dir = join(root, 'model');
    await mkdir(join(dir, 'sub'), { recursive: true });
    await writeFile(join(dir, 'weights.bin'), new Uint8Array(16));
    await writeFile(join(dir, 'sub', 'a.bin'), new Uint8Array(4));
    await writeFile(join(root, 'secret.bin'), 'secret');
  });
  afterEach(async () => { await rm(root, { recursive: true, force: true }); });

  describe('confinedPath', () => {
    it('resolves names inside the folder, links inside it too', async () => {
      await symlink(join(dir, 'sub', 'a.bin'), join(dir, 'alias.bin'));
      expect(await confinedPath(dir, 'weights.bin', 'path')).to.match(/model\/weights\.bin$/);
      expect(await confinedPath(dir, 'sub/../sub/a.bin', 'path')).to.match(/model\/sub\/a\.bin$/);
      expect(await confinedPath(dir, 'alias.bin', 'path')).to.match(/model\/sub\/a\.bin$/);
    });

    it('refuses .., absolute paths and links that lead outside the folder', async () => {
      await symlink(join(root, 'secret.bin'), join(dir, 'out.bin'));
      const up = await rejection(confinedPath(dir, '../secret.bin', 'weight file'));
      expect(up).to.be.instanceOf(FileError).and.instanceOf(MoELoraError);
      expect(up.message).to.equal(`weight file '../secret.bin' leads outside its folder '${dir}'`);
      const abs = await rejection(confinedPath(dir, '/etc/passwd', 'weight file'));
      expect(abs.message).to.equal(`weight file must be relative to its folder '${dir}' but is the absolute path '/etc/passwd'`);
      const link = await rejection(confinedPath(dir, 'out.bin', 'weight file'));
      expect(link.message).to.match(/^weight file '.*model\/out\.bin' is a link to '.*secret\.bin', outside its folder/);
    });

    it('names a missing file and a name that is not a string', async () => {
      expect((await rejection(confinedPath(dir, 'nope.bin', 'shard'))).message)
          .to.equal(`shard '${join(dir, 'nope.bin')}' does not exist`);
      expect((await rejection(confinedPath(dir, 7, 'shard'))).message)
          .to.equal(`shard must be a file name relative to '${dir}' but is 7 (number)`);
    });
  });

  describe('openRegularFile', () => {
    it('refuses a FIFO at once instead of blocking on it', async () => {
      execFileSync('mkfifo', [join(dir, 'config.json')]);
      const err = await within(5000, rejection(readJSONFile(join(dir, 'config.json'), 'config')));
      expect(err).to.be.instanceOf(FileError);
      expect(err.message).to.equal(`config '${join(dir, 'config.json')}' is a FIFO (named pipe), not a regular file`);
    });

    it('refuses devices and directories', async () => {
      expect((await rejection(openRegularFile('/dev/zero', 'weight file'))).message)
          .to.equal("weight file '/dev/zero' is a device, not a regular file");
      expect((await rejection(readRegularFile(join(dir, 'sub'), 'tokenizer'))).message)
          .to.equal(`tokenizer '${join(dir, 'sub')}' is a directory, not a regular file`);
    });

    it('checks the size before reading', async () => {
      const err = await rejection(openRegularFile(join(dir, 'weights.bin'), 'weight file', { expectedSize: 20 }));
      expect(err.message).to.equal(`weight file '${join(dir, 'weights.bin')}' is 16 bytes but must be 20`);
      const big = await rejection(readRegularFile(join(dir, 'weights.bin'), 'config', { maxBytes: 8 }));
      expect(big.message).to.equal(`config '${join(dir, 'weights.bin')}' is 16 bytes, more than the 8 accepted`);
      const { handle, size } = await openRegularFile(join(dir, 'weights.bin'), 'weight file', { expectedSize: 16 });
      await handle.close();
      expect(size).to.equal(16);
    });

    it('names a file that is not JSON', async () => {
      await writeFile(join(dir, 'config.json'), '{oops');
      const err = await rejection(readJSONFile(join(dir, 'config.json'), 'config'));
      expect(err.message).to.match(new RegExp(`^config '${join(dir, 'config.json')}' is not valid JSON: `));
    });
  });

  describe('openArtifactFolder', () => {
    it('finishes a save interrupted between its last two renames', async () => {
      const target = join(root, 'adapter');
      await mkdir(join(root, '.adapter.next'));
      await writeFile(join(root, '.adapter.next', 'adapter_config.json'), '{}');
      expect(await openArtifactFolder(target, 'adapter folder')).to.equal(target);
      expect(await readJSONFile(join(target, 'adapter_config.json'), 'config')).to.deep.equal({});
    });

    it('leaves a present folder as it is and names what is not a folder', async () => {
      await mkdir(join(root, '.model.next'));
      expect(await openArtifactFolder(dir, 'model folder')).to.equal(dir);
      expect((await rejection(openArtifactFolder(join(root, 'secret.bin'), 'model folder'))).message)
          .to.equal(`model folder '${join(root, 'secret.bin')}' is a file, not a folder`);
      expect((await rejection(openArtifactFolder(join(root, 'none'), 'model folder'))).message)
          .to.equal(`model folder '${join(root, 'none')}' does not exist`);
      expect((await rejection(openArtifactFolder('', 'model folder'))).message)
          .to.equal("model folder must be a folder path but got \"\" (string)");
    });
  });
});
