#!/usr/bin/env bash
# Container smoke test: build the image with the packaged MiniLM as base model, run
# `train` on the built-in example exactly as the README shows, check the tarball,
# then check that a bad data file fails cleanly; build the serving image and serve
# the trained model as a SageMaker endpoint does, with each content type. Uses
# docker where an engine answers, podman otherwise.  Run: make container-smoke
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-gata-ft:smoke}
WORK=${WORK:-build/container-smoke}
started=$(date +%s)

if docker info >/dev/null 2>&1; then ENGINE=docker; NET=(); else ENGINE=podman; NET=(--network host); fi
echo "== engine: $ENGINE"

# A build from changed sources leaves the images its tags had before untagged, and the
# stages the final images copy from (model, serve-builder) are images of their own
# that nothing tags: 2.6 GB a run, until a CI machine's disk filled up. So each stage
# is built under a tag too, and the image a tag had before is removed with the build
# layers only it used; other images, and the layers the new ones use, stay as cache.
image_id() { "$ENGINE" image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }
build() {  # tag, then build arguments; removes what the tag named before
  local previous
  previous=$(image_id "$1")
  $ENGINE build "${NET[@]}" -t "$1" "${@:2}" .
  if [ -n "$previous" ] && [ "$previous" != "$(image_id "$1")" ] \
      && "$ENGINE" rmi "$previous" >/dev/null 2>&1; then
    echo "== removed $1's previous image ${previous:0:19}"
  fi
}

# A CPU torch wheel, when one lies on this machine, keeps the smoke build from
# downloading the CUDA build (several GB); the production image is unchanged.
build_args=(--build-arg BASE_MODEL=sentence-transformers/all-MiniLM-L6-v2 --build-arg BASE_MODEL_SOURCE=package)
wheel=$(ls "${TORCH_WHEEL_DIR:-/opt/wheels}"/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$wheel" ]; then
  cp "$wheel" container/wheels/
  build_args+=(--build-arg TORCH_WHEELS=/wheels)
  echo "== torch from $wheel"
fi
build "$IMAGE-model" --target model "${build_args[@]}"
build "$IMAGE" "${build_args[@]}"
built=$(date +%s)

rm -rf "$WORK" && mkdir -p "$WORK/container" && cp container/endpoint_check.py "$WORK/container/" && cd "$WORK"
docker() { "$ENGINE" "$1" "${NET[@]}" "${@:2}"; }  # the README's commands, on this engine

# --- the README's local run, as written there ---
mkdir -p opt_ml/input/config opt_ml/model opt_ml/output opt_ml/checkpoints
docker run --rm -v "$PWD/opt_ml/input:/opt/ml/input" "$IMAGE" example /opt/ml/input/data
echo '{"num_train_epochs": "1", "learning_rate": "0.0001", "max_length": "128"}' > opt_ml/input/config/hyperparameters.json
docker run --rm \
  -v "$PWD/opt_ml/input:/opt/ml/input" \
  -v "$PWD/opt_ml/model:/opt/ml/model" \
  -v "$PWD/opt_ml/output:/opt/ml/output" \
  -v "$PWD/opt_ml/checkpoints:/opt/ml/checkpoints" \
  -e SM_CHANNEL_TRAIN=/opt/ml/input/data/train -e SM_CHANNEL_TEST=/opt/ml/input/data/test \
  -e SM_MODEL_DIR=/opt/ml/model -e SM_OUTPUT_DATA_DIR=/opt/ml/output/data -e SM_NUM_GPUS=0 \
  "$IMAGE" train
docker run --rm -v "$PWD/opt_ml/model:/opt/ml/model" "$IMAGE" inspect /opt/ml/model/model.tar.gz > inspect.json
docker run --rm -v "$PWD/opt_ml/model:/opt/ml/model" "$IMAGE" predict /opt/ml/model/model.tar.gz --verify-golden --text "where is my parcel"
# --- end of the README's local run ---

echo "== checking the artifact"
test "$(ls opt_ml/model)" = "model.tar.gz" || { echo "model dir holds more than model.tar.gz" >&2; exit 1; }
for file in config.json model.safetensors tokenizer.json onnx/model.onnx onnx/model_quantized.onnx golden.json; do
  grep -q "\"$file\"" inspect.json || { echo "model.tar.gz lacks $file" >&2; exit 1; }
done
grep -q '"format_version": 2' inspect.json
test -s opt_ml/output/data/metrics.json && test -s opt_ml/output/data/parity.json
test ! -e opt_ml/output/failure

echo "== a bad data file must fail cleanly"
mkdir -p bad/input/config bad/model bad/output
cp -r opt_ml/input/data bad/input/data
echo '{"label": 1.5, "text": "Broken Row"}' >> bad/input/data/train/data.json
set +e
docker run --rm -v "$PWD/bad/input:/opt/ml/input" -v "$PWD/bad/model:/opt/ml/model" \
  -v "$PWD/bad/output:/opt/ml/output" "$IMAGE" train
code=$?
set -e
test "$code" -ne 0 || { echo "bad data: expected a non-zero exit" >&2; exit 1; }
grep -q "label: expected a non-negative integer, found 1.5 (a float)" bad/output/failure
test -z "$(ls bad/model)" || { echo "bad data: the model dir is not empty" >&2; exit 1; }

echo "== the serving image: serve the trained model as a SageMaker endpoint does"
cd - >/dev/null
build "$IMAGE-serve-builder" --target serve-builder
build "$IMAGE-serve" --target serve
cd "$WORK"
mkdir -p endpoint/model && tar xzf opt_ml/model/model.tar.gz -C endpoint/model  # SageMaker extracts it
for image in "$IMAGE-serve" "$IMAGE"; do
  port=$((18080 + RANDOM % 1000))
  t0=$(date +%s.%N)
  name=$(docker run -d --rm -e SAGEMAKER_BIND_TO_PORT=$port -v "$PWD/endpoint/model:/opt/ml/model" "$image" serve)
  python3 container/endpoint_check.py "http://127.0.0.1:$port" "$t0" "$image" || { "$ENGINE" logs "$name"; "$ENGINE" stop "$name"; exit 1; }
  "$ENGINE" stop "$name" >/dev/null
done
for image in "$IMAGE" "$IMAGE-serve"; do
  echo "== image $image: $(( $("$ENGINE" image inspect --format '{{.Size}}' "$image") / 1000000 )) MB"
done
finished=$(date +%s)
echo "== container smoke test passed: build $((built - started)) s, runs $((finished - built)) s, total $((finished - started)) s (exit code on bad data: $code)"
