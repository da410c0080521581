# o2v-jax: Object2Vec in JAX/Flax. `just` lists the recipes.

venv := ".venv"
py := venv / "bin/python"

# List the recipes
default:
    @just --list

# Create .venv (once) and install the project with its dev extras into it
install:
    @test -x {{py}} || python3 -m venv {{venv}}
    @test {{venv}}/.installed -nt pyproject.toml || ({{py}} -m pip install -q --upgrade pip && {{py}} -m pip install -q -e '.[dev]' && touch {{venv}}/.installed)

# The main job: MovieLens 100k end to end (fetch, train, evaluate, embed, neighbours)
demo *ARGS: install
    {{venv}}/bin/o2v demo {{ARGS}}

# Run the test suite
test *ARGS: install
    {{py}} -m pytest -q {{ARGS}}

# Serve the shipped MovieLens model on 127.0.0.1:8080
serve *ARGS: install
    {{venv}}/bin/o2v serve --model-dir checkpoints/movielens-100k {{ARGS}}

# Run the benchmarks (baselines in the same run; results go to benchmarks/RESULTS.md by hand)
bench *ARGS: install
    {{py}} -m pip install -q -e '.[bench]'
    {{py}} benchmarks/run_all.py {{ARGS}}

# Train from a hyperparameters file: just train --train data/train.jsonl --model-dir runs/m ...
train *ARGS: install
    {{venv}}/bin/o2v train {{ARGS}}
