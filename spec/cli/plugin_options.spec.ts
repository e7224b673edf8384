/** The plugin args as CLI flags: generated from the schema, parsed with yargs, validated like register(). */
import { expect } from 'chai';
import yargs from 'yargs';
import { PluginArgsError } from '../../src/args/errors.js';
import { EXPERT_DROPOUT_NEEDS_SPLIT, PLUGIN_ARG_SPECS, type PluginArgs } from '../../src/args/schema.js';
import { flagOf, pluginArgsFromArgv, pluginOptions, PLUGIN_FLAG_SPECS } from '../../src/cli/plugin_options.js';
import { register } from '../../src/plugin.js';

/** Parses argv with the plugin options (no check) and converts. */
async function parse(argv: string[]) {
  const parsed = await pluginOptions(yargs(argv), { check: false }).exitProcess(false).strict(false).parseAsync();
  return pluginArgsFromArgv(parsed as Record<string, unknown>);
}

async function problems(argv: string[]): Promise<string[]> {
  try {
    await parse(argv);
    return [];
  } catch (err) {
    if (err instanceof PluginArgsError) return err.message.split('\n').slice(1).map(l => l.replace(/^ {2}- /, ''));
    throw err;
  }
}

/** The lines register() gives for the same args as objects. */
function registerProblems(args: PluginArgs): string[] {
  try {
    register(args).unregister();
    return [];
  } catch (err) {
    return (err as PluginArgsError).problems.map(p => p.message);
  }
}

describe('CLI: plugin flags', () => {
  it('every schema arg except models, lora itself and the pattern objects has a flag', () => {
    expect(PLUGIN_FLAG_SPECS.map(s => `--${s.flag}`)).to.deep.equal([
      '--expert-kernel', '--lora-mode', '--strict', '--lora-rank', '--lora-alpha', '--lora-dropout', '--lora-rslora',
      '--lora-targets', '--lora-adapter-name']);
    expect(PLUGIN_ARG_SPECS.filter(s => s.flag === undefined).map(s => s.path)).to.deep.equal(
        ['models', 'lora', 'lora.rankPattern', 'lora.alphaPattern']);
    expect(flagOf('lora.r')).to.equal('--lora-rank');
    expect(flagOf('models')).to.equal(undefined);
  });

  it('parses the full set of flags into plugin args', async () => {
    const args = await parse(['--expert-kernel', 'fused', '--lora-rank', '8', '--lora-alpha', '16',
      '--lora-targets', 'experts.gate_up,experts.down,router', '--lora-mode', 'auto', '--strict']);
    expect(args).to.deep.equal({
      expertKernel: 'fused', loraMode: 'auto', strict: true, models: [],
      lora: { r: 8, alpha: 16, dropout: 0, rsLoRA: false, targets: ['experts.gate_up', 'experts.down', 'router'], rankPattern: {}, alphaPattern: {}, adapterName: 'default' },
    });
  });

  it('no flags: the defaults and no LoRA; --lora-mode alone does not turn LoRA on', async () => {
    expect(await parse([])).to.deep.equal({ expertKernel: 'fused', loraMode: 'auto', strict: false, models: [], lora: null });
    expect((await parse(['--lora-mode', 'split'])).lora).to.equal(null);
  });

  it('repeated --lora-targets add up; --lora-rslora, --lora-adapter-name, --lora-dropout 0, --no-strict', async () => {
    const args = await parse(['--lora-rank', '4', '--lora-alpha', '4.5', '--lora-targets', 'router', '--lora-targets',
      'shared.up, shared.down', '--lora-rslora', '--lora-adapter-name', 'run-1', '--lora-dropout', '0', '--no-strict']);
    expect(args.lora).to.deep.equal({ r: 4, alpha: 4.5, dropout: 0, rsLoRA: true, targets: ['router', 'shared.up', 'shared.down'],
      rankPattern: {}, alphaPattern: {}, adapterName: 'run-1' });
    expect(args.strict).to.equal(false);
  });

  it('bad values: the same lines as register(), each prefixed by its flag', async () => {
    const lines = await problems(['--expert-kernel', 'fast', '--lora-rank', '0', '--lora-alpha', '-1', '--lora-dropout', '0.1',
      '--lora-targets', 'experts.gateup']);
    const same = registerProblems({ expertKernel: 'fast' as never, lora: { r: 0, alpha: -1, dropout: 0.1, targets: ['experts.gateup' as never] } });
    expect(same).to.have.length(4);
    expect(lines).to.deep.equal([
      "--expert-kernel: expertKernel: expected one of 'fused', 'reference' but got 'fast' (string)",
      '--lora-rank: lora.r: expected an integer >= 1 but got 0 (number)',
      '--lora-alpha: lora.alpha: expected a finite number > 0 but got -1 (number)',
      "--lora-targets: lora.targets[0]: expected one of 'experts.gate_up', 'experts.down', 'router', 'shared.gate', 'shared.up', " +
          "'shared.down', 'shared.sigmoid_gate', 'all-linear', 'q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj' (module names " +
          "may have a path before the projection: 'self_attn.q_proj') but got 'experts.gateup' (string); did you mean 'experts.gate_up'?",
    ]);
    expect(lines).to.deep.equal(same.map((l, i) => `${lines[i].split(': ')[0]}: ${l}`));
  });

  it('the dropout rule with its reason: expert dropout needs split LoRA', async () => {
    expect(await problems(['--lora-rank', '8', '--lora-alpha', '16', '--lora-dropout', '0.05'])).to.deep.equal([]);
    expect(await problems(['--lora-rank', '8', '--lora-alpha', '16', '--lora-dropout', '0.05', '--lora-mode', 'materialize'])).to.deep.equal([
      `--lora-mode: loraMode: expected 'split' or 'auto' with lora.dropout 0.05 on expert targets (experts.gate_up, experts.down) but got 'materialize': ${EXPERT_DROPOUT_NEEDS_SPLIT}`]);
  });

  it('a value that is not a number stays as typed in the message; a missing rank; a repeated single-value flag', async () => {
    expect(await problems(['--lora-rank', 'abc', '--lora-alpha', '16'])).to.deep.equal([
      "--lora-rank: lora.r: expected an integer >= 1 but got 'abc' (string)"]);
    expect(await problems(['--lora-alpha', '16'])).to.deep.equal([
      "--lora-rank: lora.r: expected an integer >= 1 but got nothing (required when 'lora' is given)"]);
    expect(await problems(['--lora-rank', '8', '--lora-rank', '4', '--lora-alpha', '16'])).to.deep.equal([
      "--lora-rank: lora.r: expected one value but got 2 ('8', '4')",
      "--lora-rank: lora.r: expected an integer >= 1 but got nothing (required when 'lora' is given)"]);
  });

  it('a misspelt plugin flag: did you mean', async () => {
    expect(await problems(['--lora-rnak', '8', '--lora-alpha', '16', '--lora-rank', '8'])).to.deep.equal([
      '--lora-rnak: unknown flag (expected one of --expert-kernel, --lora-mode, --strict, --lora-rank, --lora-alpha, ' +
          '--lora-dropout, --lora-rslora, --lora-targets, --lora-adapter-name); did you mean --lora-rank?']);
  });

  it('the builder’s check fails the yargs parse with the validation message; the header names the command line', async () => {
    let failure: string | undefined;
    await pluginOptions(yargs(['--lora-rank', '0', '--lora-alpha', '2'])).exitProcess(false)
      .fail(msg => { failure = msg; }).parseAsync();
    expect(failure).to.equal('command line: 1 problem with the plugin args:\n  - --lora-rank: lora.r: expected an integer >= 1 but got 0 (number)');
    let ok = true;
    await pluginOptions(yargs(['--lora-rank', '2', '--lora-alpha', '2'])).exitProcess(false).fail(() => { ok = false; }).parseAsync();
    expect(ok).to.equal(true);
  });

  it('the help lists every flag with its description, choices and LoRA defaults', async () => {
    const help = await pluginOptions(yargs([])).exitProcess(false).wrap(null).getHelp();
    for (const spec of PLUGIN_FLAG_SPECS) expect(help).to.include(`--${spec.flag}`);
    expect(help).to.include('Plugin:');
    expect(help).to.include('(fused | reference)');
    expect(help).to.include('comma-separated; default with LoRA: experts.gate_up,experts.down');
    expect(help).to.include('required with LoRA');
  });
});
