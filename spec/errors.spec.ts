import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import * as api from '../src/index.js';
import { MoELoraError } from '../src/errors.js';

/** Runs a small ES module with tsx in its own process. */
function runScript(source: string) {
  const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', source],
      { encoding: 'utf8', cwd: process.cwd() });
  return { code: r.status, stderr: r.stderr };
}

describe('errors', () => {
  it('every error class the package exports is a MoELoraError', () => {
    const classes = Object.entries(api).filter(([name, v]) => typeof v === 'function' && /^[A-Z]\w*Error$/.test(name));
    expect(classes.length).to.be.greaterThan(8);
    for (const [name, cls] of classes) {
      const proto = (cls as { prototype: object }).prototype;
      expect(proto instanceof MoELoraError || cls === MoELoraError, name).to.equal(true);
    }
  });

  it('an uncaught error after the wasm backend is set reports where it was thrown, not the glue\'s minified code', function () {
    this.timeout(60000);
    const r = runScript(`
      import { selectBackend } from './src/cli/backend.ts';
      await selectBackend('wasm');
      setTimeout(() => { throw new Error('boom from user code'); });`);
    expect(r.code).to.equal(1);
    expect(r.stderr).to.include('boom from user code');
    expect(r.stderr).not.to.include('tf-backend-wasm');
    expect(r.stderr.length).to.be.lessThan(2000);
  });

  it('the CLI reports a stray error in one line: a user error by its message, a bug as an internal error', function () {
    this.timeout(60000);
    const user = runScript(`
      import { installProcessErrorReport } from './src/cli/main.ts';
      import { FileError } from './src/util/files.ts';
      installProcessErrorReport();
      setTimeout(() => { throw new FileError("config 'x' is a FIFO (named pipe), not a regular file"); });`);
    expect(user.code).to.equal(1);
    expect(user.stderr).to.equal("tfjs-moe-lora: error: config 'x' is a FIFO (named pipe), not a regular file\n");
    const bug = runScript(`
      import { installProcessErrorReport } from './src/cli/main.ts';
      installProcessErrorReport();
      Promise.reject(new TypeError('x.y is not a function'));`);
    expect(bug.code).to.equal(1);
    expect(bug.stderr).to.equal('tfjs-moe-lora: internal error: TypeError: x.y is not a function\n' +
        '  (please report it with the command and the output of a run with TFJS_MOE_LORA_DEBUG=1)\n');
  });
});
