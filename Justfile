# o2v-jax: Object2Vec in JAX/Flax. `./just` lists the recipes; it installs the pinned
# `just` into .venv on first use (see the script's header).

# Recipe arguments reach commands as "$@", each one word: ./just test -k "a or b" works.
set positional-arguments

venv := ".venv"
py := venv / "bin/python"

# List the recipes
default:
    @{{just_executable()}} --justfile {{justfile()}} --list

# Install the project with its dev extras into .venv (again when pyproject.toml changes)
install:
    @test -x {{py}} || ./just --version > /dev/null
    @test {{venv}}/.installed -nt pyproject.toml || (echo "o2v-jax: installing o2v-jax and its dependencies (jax, flax, optax, orbax, ...) into .venv; a few minutes the first time" >&2 && PIP_DISABLE_PIP_VERSION_CHECK=1 {{py}} -m pip install -q -e '.[dev]' && touch {{venv}}/.installed)

# The main job: MovieLens 100k end to end (fetch, train, evaluate, embed, neighbours)
demo *ARGS: install
    {{venv}}/bin/o2v demo "$@"

# Run the test suite (two worker processes, each test file on one of them: module fixtures
# run once; `./just test -n 8` for more, `-n 0` for none)
test *ARGS: install
    {{py}} -m pytest -q -n 2 --dist loadfile "$@"

# Serve the shipped MovieLens model on 127.0.0.1:8080
serve *ARGS: install
    {{venv}}/bin/o2v serve --model-dir checkpoints/movielens-100k "$@"

# Run the benchmarks (baselines in the same run; results go to benchmarks/RESULTS.md by hand)
bench *ARGS: install
    PIP_DISABLE_PIP_VERSION_CHECK=1 {{py}} -m pip install -q -e '.[bench]'
    {{py}} benchmarks/run_all.py "$@"

# Train from a hyperparameters file: ./just train --train data/train.jsonl --model-dir runs/m ...
train *ARGS: install
    {{venv}}/bin/o2v train "$@"
