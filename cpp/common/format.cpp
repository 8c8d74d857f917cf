#include "common/kernels.h"

namespace lowbit {

// NF4 (QLoRA, Dettmers et al. 2023): quantiles of N(0,1) rescaled to [-1, 1], with an exact 0.
const float kNF4Values[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// (v[i] + v[i+1]) / 2 in float32; x maps to the number of midpoints strictly below it.
const float kNF4Midpoints[15] = {
    (kNF4Values[0] + kNF4Values[1]) * 0.5f,   (kNF4Values[1] + kNF4Values[2]) * 0.5f,
    (kNF4Values[2] + kNF4Values[3]) * 0.5f,   (kNF4Values[3] + kNF4Values[4]) * 0.5f,
    (kNF4Values[4] + kNF4Values[5]) * 0.5f,   (kNF4Values[5] + kNF4Values[6]) * 0.5f,
    (kNF4Values[6] + kNF4Values[7]) * 0.5f,   (kNF4Values[7] + kNF4Values[8]) * 0.5f,
    (kNF4Values[8] + kNF4Values[9]) * 0.5f,   (kNF4Values[9] + kNF4Values[10]) * 0.5f,
    (kNF4Values[10] + kNF4Values[11]) * 0.5f, (kNF4Values[11] + kNF4Values[12]) * 0.5f,
    (kNF4Values[12] + kNF4Values[13]) * 0.5f, (kNF4Values[13] + kNF4Values[14]) * 0.5f,
    (kNF4Values[14] + kNF4Values[15]) * 0.5f};

}  // namespace lowbit
