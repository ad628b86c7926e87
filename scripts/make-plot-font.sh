#!/usr/bin/env bash
# Makes distill/assets/DejaVuSans-plot.ttf, the font embedded in surgeon's plots (so that they render
# on a headless machine with no system fonts): DejaVu Sans (Bitstream Vera / DejaVu licence, see
# distill/assets/DejaVu-LICENSE.txt) cut down to printable ASCII and a few symbols with fontTools.
# Needs the Debian package fonts-dejavu-core and `pip install fonttools`. Run from the repository root.
set -euo pipefail
src=${1:-/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf}
[ -f "$src" ] || { echo "no $src: apt-get install fonts-dejavu-core (or pass the TTF)" >&2; exit 1; }
python3 -c "import fontTools" 2>/dev/null || { echo "needs fontTools: python3 -m pip install fonttools" >&2; exit 1; }
python3 -m fontTools.subset "$src" --unicodes="U+0020-007E,U+00B0,U+00B1,U+00B7,U+00D7,U+2013,U+2014,U+2026,U+2212,U+2192" \
  --layout-features='' --no-hinting --desubroutinize --output-file=distill/assets/DejaVuSans-plot.ttf
ls -l distill/assets/DejaVuSans-plot.ttf
