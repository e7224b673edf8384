/**
 * The rules that hold the args against each MoE layer found in args.models: the routing config
 * against E (K ≤ E, groups divide E, topkGroup·(E/nGroup) ≥ K) and the LoRA settings against the
 * layer (supported and existing targets, rank ≤ min(in, out) of each targeted weight, an existing
 * adapter of the same name that differs).
 */
import type { PluginArgsProblem } from '../args/errors.js';
import type { PartialResolvedArgs } from '../args/validate.js';
import { describeValue } from '../args/validate.js';
import { LORA_TARGETS, SHARED_LORA_TARGETS, type LoRATarget } from '../layers/sparse_moe.js';
import { registeredRoutingKinds } from '../ops/routing/route.js';
import type { RoutingKind } from '../ops/types.js';
import { allDescriptors, describeMoELayer, type MoELayerInfo } from './descriptor.js';
import type { FoundMoELayer } from './find_layers.js';

const GROUPED_KINDS: readonly RoutingKind[] = ['sigmoidGroupTopK', 'softmaxGroupTopK', 'softmaxGroupLimitedGreedy'];

const isInt = (v: unknown): v is number => typeof v === 'number' && Number.isInteger(v);

function routingProblems(info: MoELayerInfo): string[] {
  const out: string[] = [];
  const { routing, numExperts: E } = info;
  const kinds = registeredRoutingKinds();
  if (!kinds.includes(routing.kind)) {
    out.push(`routing.kind: expected one of ${kinds.map(k => `'${k}'`).join(', ')} but got ${describeValue(routing.kind)}`);
    return out;
  }
  const K = routing.topK;
  if (!isInt(K) || K < 1 || K > E) {
    out.push(`routing.topK: expected an integer in [1, numExperts = ${E}] (K <= E) but got ${describeValue(K)}`);
    return out;
  }
  if (!GROUPED_KINDS.includes(routing.kind)) return out;
  const nGroup = routing.nGroup ?? 1;
  const topkGroup = routing.topkGroup ?? 1;
  if (!isInt(nGroup) || nGroup < 1 || E % nGroup !== 0) {
    out.push(`routing.nGroup: expected a divisor of numExperts (${E}) but got ${describeValue(nGroup)}`);
    return out;
  }
  if (!isInt(topkGroup) || topkGroup < 1 || topkGroup > nGroup) {
    out.push(`routing.topkGroup: expected an integer in [1, nGroup = ${nGroup}] but got ${describeValue(topkGroup)}`);
    return out;
  }
  const kept = topkGroup * (E / nGroup);
  if (K > kept) {
    out.push(`routing.topK: expected <= topkGroup·(E/nGroup) = ${topkGroup}·(${E}/${nGroup}) = ${kept} ` +
        `(the experts of the kept groups) but got ${K}`);
  }
  return out;
}

/** [out, in] of a target's weight (per expert for the experts), with names for the message; null = not known yet. */
function targetDims(target: LoRATarget, info: MoELayerInfo): { out: [string, number | null]; in: [string, number | null] } {
  const H: [string, number | null] = ['H', info.hidden];
  const I: [string, number | null] = ['I', info.intermediateSize];
  const Is: [string, number | null] = ['I_s', info.sharedIntermediateSize];
  switch (target) {
    case 'experts.gate_up': return { out: ['2I', 2 * info.intermediateSize], in: H };
    case 'experts.down': return { out: H, in: I };
    case 'router': return { out: ['E', info.numExperts], in: H };
    case 'shared.gate': case 'shared.up': return { out: Is, in: H };
    case 'shared.down': return { out: H, in: Is };
    case 'shared.sigmoid_gate': return { out: ['1', 1], in: H };
  }
}

function loraProblems(found: FoundMoELayer, info: MoELayerInfo, lora: NonNullable<PartialResolvedArgs['lora']>): PluginArgsProblem[] {
  const out: PluginArgsProblem[] = [];
  const { descriptor: d, layer, where } = found;
  const add = (arg: string, text: string) => out.push({ arg, message: `${where}: ${text}` });
  if (d.lora === undefined) {
    add('lora', `lora: expected a layer that takes LoRA adapters but the ${d.className} descriptor has no 'lora' hooks ` +
        '(register it with lora: {targets, adapterNames, add, remove}, or leave lora out)');
    return out;
  }
  // module names and 'all-linear' are resolved against the models' modules (linear_targets.ts)
  const targets = lora.targets?.filter((t): t is LoRATarget => (LORA_TARGETS as readonly string[]).includes(t));
  if (targets !== undefined) {
    const unsupported = targets.filter(t => !d.lora!.targets.includes(t));
    if (unsupported.length > 0) {
      add('lora.targets', `lora.targets: expected targets that ${d.className} supports ` +
          `(${d.lora.targets.map(t => `'${t}'`).join(', ')}) but got ${unsupported.map(t => `'${t}'`).join(', ')}`);
    }
    const shared = targets.filter(t => SHARED_LORA_TARGETS.includes(t));
    if (shared.length > 0 && info.sharedIntermediateSize === null) {
      add('lora.targets', `lora.targets: expected shared-expert targets only on a layer with a shared expert, ` +
          `but the layer has none and got ${shared.map(t => `'${t}'`).join(', ')}`);
    }
    if (targets.includes('shared.sigmoid_gate') && info.sharedIntermediateSize !== null && info.sharedGated !== true) {
      add('lora.targets', "lora.targets: expected 'shared.sigmoid_gate' only on a layer whose shared expert is gated " +
          "(Qwen2-MoE's shared_expert_gate), but the layer's is not");
    }
    if (lora.r !== undefined) {
      for (const t of targets) {
        if (SHARED_LORA_TARGETS.includes(t) && info.sharedIntermediateSize === null) continue;
        // PEFT's all-linear adapts the 1-wide gate with the adapter's r (a rank above 1 adds nothing, but loads)
        if (t === 'shared.sigmoid_gate') continue;
        const dims = targetDims(t, info);
        const known = [dims.out[1], dims.in[1]].filter((v): v is number => v !== null);
        const limit = Math.min(...known);
        if (known.length > 0 && lora.r > limit) {
          const show = ([n, v]: [string, number | null]) => `${n} = ${v ?? '? (not built)'}`;
          add('lora.r', `lora.r: expected <= min(in, out) = ${limit} of ${t} ` +
              `(${t.startsWith('experts.') ? 'per expert ' : ''}[out ${show(dims.out)}, in ${show(dims.in)}]) but got ${lora.r}`);
        }
      }
    }
  }
  const name = lora.adapterName;
  if (name !== undefined && d.lora.adapterNames(layer).includes(name) && d.lora.adapterConfig) {
    const have = d.lora.adapterConfig(layer, name);
    const want = { ...lora, targets };
    const fmt = (c: { r?: number; alpha?: number; rsLoRA?: boolean; targets?: readonly string[] }) =>
      `r = ${c.r}, alpha = ${c.alpha}, rsLoRA = ${c.rsLoRA ?? false}, targets ${[...(c.targets ?? [])].join(', ')}`;
    const same = have !== undefined && have.r === want.r && have.alpha === want.alpha &&
        (have.rsLoRA ?? false) === want.rsLoRA && want.targets !== undefined &&
        have.targets.length === want.targets.length && want.targets.every(t => have.targets.includes(t));
    if (have !== undefined && !same && want.r !== undefined && want.alpha !== undefined && want.targets !== undefined) {
      add('lora', `lora: expected the layer's existing adapter '${name}' to match the args (${fmt(want)}) but it has ` +
          `${fmt(have)}; remove it or choose another lora.adapterName`);
    }
  }
  return out;
}

/** Every problem of the args against the MoE layers found, and the models that have none. */
export function checkMoELayers(
    found: readonly FoundMoELayer[], layersPerModel: readonly number[], args: PartialResolvedArgs,
): { problems: PluginArgsProblem[]; infos: Map<FoundMoELayer, MoELayerInfo> } {
  const problems: PluginArgsProblem[] = [];
  const infos = new Map<FoundMoELayer, MoELayerInfo>();
  layersPerModel.forEach((n, i) => {
    if (n === 0) {
      problems.push({ arg: 'models', message: `models[${i}]: expected a model or layer with at least one MoE layer ` +
          `(classes with a descriptor: ${allDescriptors().map(d => d.className).join(', ')}) but found none; ` +
          'register a descriptor for its MoE layer class with registerMoELayerDescriptor' });
    }
  });
  for (const f of found) {
    let info: MoELayerInfo;
    if (!f.layer.built && f.descriptor.describe === undefined) {
      problems.push({ arg: 'models', message: `${f.where}: expected a built layer (call the model once or build the ` +
          'layer) to check it against the args, but it is not built' });
      continue;
    }
    try {
      info = describeMoELayer(f.descriptor, f.layer);
    } catch (err) {
      problems.push({ arg: 'models', message: `${f.where}: expected a readable MoE block but the descriptor failed: ${(err as Error).message}` });
      continue;
    }
    infos.set(f, info);
    for (const text of routingProblems(info)) problems.push({ arg: 'models', message: `${f.where}: ${text}` });
    if (args.lora != null) problems.push(...loraProblems(f, info, args.lora));
  }
  return { problems, infos };
}
