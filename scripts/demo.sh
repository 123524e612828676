#!/usr/bin/env bash
# Installs dependencies, builds nemofs, mounts the bundled sample .nemo
# read-only, shows the tree, unmounts; then edits the config of a copy of it
# through a read-write mount and shows the edit saved in the archive.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

scripts/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)" --target nemofs

nemofs="$repo/build/nemofs"
sample="$repo/tests/data/tiny_gpt.nemo"
mnt=$(mktemp -d /tmp/nemofs-demo.XXXXXX)
work=$(mktemp -d /tmp/nemofs-demo-copy.XXXXXX)
cleanup() {
  if mountpoint -q "$mnt" 2>/dev/null; then "$nemofs" umount "$mnt" || fusermount3 -uz "$mnt"; fi
  rmdir "$mnt" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

run() { echo; echo "\$ $*"; "$@"; }

run "$nemofs" info "$sample"
run "$nemofs" ls "$sample" 'model.decoder.layers.0.*'
run "$nemofs" mount -o ro "$sample" "$mnt"
run ls -lR "$mnt"
run getfattr -d "$mnt/tensors/model.output_layer.weight"
echo; echo "\$ /usr/bin/python3 -c 'numpy.fromfile(\"$mnt/tensors/model.decoder.final_layernorm.weight\", numpy.int16)'  # bfloat16 bits"
/usr/bin/python3 -c "import numpy; print(numpy.fromfile('$mnt/tensors/model.decoder.final_layernorm.weight', numpy.int16)[:8])"
echo; echo "\$ head -n 25 $mnt/config.yaml"; head -n 25 "$mnt/config.yaml"
echo; echo "\$ cmp $mnt/archive/model_weights.ckpt <(tar -xOf $sample ./model_weights.ckpt)"
cmp "$mnt/archive/model_weights.ckpt" <(tar -xOf "$sample" ./model_weights.ckpt) && echo "identical"
run sha256sum "$mnt/tokenizer/tokenizer.model" "$mnt/archive/73a06e1aa17c45d28419c66d295163b8_tokenizer.model"
run "$nemofs" umount "$mnt"

# Editing the config in place, on a copy (the sample stays as shipped).
copy="$work/edited.nemo"
cp "$sample" "$copy"
run "$nemofs" mount "$copy" "$mnt"
run sed -i 's/^precision: .*/precision: 16-mixed/' "$mnt/config.yaml"
run grep '^precision' "$mnt/config.yaml"
echo; echo "\$ echo 'broken: [' | tee -a $mnt/config.yaml   # invalid YAML: refused, nothing saved"
echo 'broken: [' | tee -a "$mnt/config.yaml" >/dev/null || echo "(tee exit status $?)"
run "$nemofs" umount "$mnt"
run tar -tvf "$copy"
echo; echo "\$ /usr/bin/python3 -c 'print(tarfile.open(\"$copy\").extractfile(\"./model_config.yaml\").read())' | grep precision   # the last copy wins"
/usr/bin/python3 -c "import tarfile; print(tarfile.open('$copy').extractfile('./model_config.yaml').read().decode())" | grep '^precision'
run "$nemofs" repack "$copy"
run tar -tvf "$copy"
echo; echo "demo finished: browsed $sample read-only; edited the config of a copy and repacked it"
