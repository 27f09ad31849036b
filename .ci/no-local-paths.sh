#!/usr/bin/env bash
# Fails when a tracked file names a place that exists only on the machine it
# was written on: a folder beside the repository (`../shared`) or an
# absolute path of a build machine (/work/…, /root/…, /home/<someone>/…).
# What a user needs must live in the repository. Called by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
printf '\n== %s\n' ".ci/no-local-paths.sh: no tracked file names a path outside the repository"

# `(^|[^…])` keeps relative paths that merely contain such a folder
# (`docs/work/…`) out; this file is left out since it names the patterns.
pattern='\.\./shared\b|(^|[^A-Za-z0-9_.~/-])/(work|root)/|(^|[^A-Za-z0-9_.~/-])/home/[A-Za-z0-9_.-]+'
if git grep -nIE "$pattern" -- . ':(exclude).ci/no-local-paths.sh'; then
  echo >&2
  echo "The lines above name a path outside the repository or of one machine" >&2
  echo "(../shared, /work/, /root/, /home/NAME): point into the repository instead," >&2
  echo "or take the path from an environment variable or an argument." >&2
  exit 1
fi
echo "ok"
