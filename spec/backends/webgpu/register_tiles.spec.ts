/**
 * The f32 grouped products' register tiles stay in registers: GroupedMatMulProgram's and
 * GroupedWeightGradProgram's WGSL index `acc` by integer literals only. A loop over it that the
 * shader compiler does not unroll makes it addressable, i.e. local memory, in the product's inner
 * loop too: on the H100 (run Z33) the LoRA tail's loop over a uniform rank inside the epilogue's
 * loops did that, and the f32 split-LoRA Q block took 1319 ms against 137. Plain JS over the
 * programs' shader text (no device); in the webgpu suite beside the programs' other specs.
 */
import { expect } from 'chai';
import {
  GroupedMatMulProgram, GroupedWeightGradProgram, type TileConfig,
} from '../../../src/backends/webgpu/programs/grouped_matmul_program.js';

/** every index expression of acc in the WGSL that is not an integer literal */
function variableAccIndices(code: string, tile: TileConfig): string[] {
  const indices = [...code.matchAll(/\bacc\[([^\]]*)\]/g)].map(m => m[1].trim());
  // the accumulation and the stores each index every element
  expect(indices.length, `acc's indices on tile ${JSON.stringify(tile)}`).to.be.at.least(2 * tile.tm * tile.tn);
  return indices.filter(i => !/^\d+$/.test(i));
}

// the tiles the kernels pick (experts.ts's tunings, kernels.ts's dense tiles) and a vec4 one of each size
const TILES: TileConfig[] = [
  { tm: 8, tn: 8, bk: 16 }, { tm: 8, tn: 8, bk: 16, vec4: true }, { tm: 4, tn: 4, bk: 16 }, { tm: 4, tn: 4, bk: 16, vec4: true },
  { tm: 2, tn: 4, bk: 16 }, { tm: 1, tn: 4, bk: 16 }, { tm: 1, tn: 2, bk: 8 },
];

describe('webgpu: the f32 grouped products index their register tile by constants only (run Z33)', () => {
  for (const tile of TILES) {
    it(`GroupedMatMulProgram, tile ${JSON.stringify(tile)}: with and without a LoRA tail, bias, addend, one group or a plan`, () => {
      for (const loraTail of [false, true]) {
        for (const singleGroup of [false, true]) {
          const program = new GroupedMatMulProgram(256, 96, {
            source: singleGroup ? 'rows' : 'gather', hasBias: true, hasAddend: true, kContiguous: true, tile, singleGroup, loraTail,
          });
          expect(variableAccIndices(program.getUserCode(), tile), `tail ${loraTail}, single group ${singleGroup}`).to.deep.equal([]);
        }
      }
    });

    it(`GroupedWeightGradProgram, tile ${JSON.stringify(tile)}: gathered and plain operands, scaled or not`, () => {
      for (const [left, right, scaleLeft] of [['gather', 'rows', true], ['rows', 'gather', false], ['rows', 'act', false]] as const) {
        const program = new GroupedWeightGradProgram([4, 96, 64], 4, 96, 64, {
          left, right, scaleLeft, tile, activation: right === 'act' ? { kind: 'swiglu', interleaved: false } : undefined,
        });
        expect(variableAccIndices(program.getUserCode(), tile), `${left} × ${right}`).to.deep.equal([]);
      }
    });
  }
});
