# Exact pre-tokenizer (the regex "split" step of tiktoken) for cl100k_base and o200k_base.
#
# Included by tokens.pyx, which must already have
#     from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
#
# The patterns (tiktoken 0.14, tiktoken_ext/openai_public.py):
#
# cl100k_base:
#   '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+
#   |\s++$|\s*[\r\n]|\s+(?!\S)|\s
# o200k_base:
#   [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?
#   |[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?
#   |\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+
#
# Semantics are those of tiktoken's engine (fancy-regex over regex-syntax 0.8.11 Unicode tables):
# leftmost-first alternation, greedy quantifiers with backtracking, possessive ones without.
# Each alternative is hand-compiled below; the derivations are in the comments of pt_next_cl100k
# and pt_next_o200k.  Every code point belongs to exactly one of L, N, White_Space or "other"
# (White_Space chars are Zs/Zl/Zp/Cc), so both patterns cover every position of the text.
#
# Character classes: a two-stage table built by pt_init() from PT_UCD_BLOB, a run-length encoding
# of the general categories of Unicode 16.0.0 (the version of regex-syntax 0.8.11, which tiktoken
# 0.14 is built with) plus the White_Space property.  See tests/test_pretokenize.py for the
# generator (gen_ucd_blob) and the checks against tiktoken itself.

from libc.stdlib cimport malloc, free
from libc.string cimport memset, memcpy
from cpython.unicode cimport PyUnicode_KIND, PyUnicode_DATA, PyUnicode_GET_LENGTH, \
    PyUnicode_1BYTE_KIND, PyUnicode_2BYTE_KIND

ctypedef fused pt_char:      # the three PEP 393 storage widths
    uint8_t
    uint16_t
    uint32_t

cdef enum PretokenizerKind:
    PT_CL100K = 1
    PT_O200K = 2

# class flag bits (one byte per code point)
cdef enum:
    PT_F_L = 1        # \p{L}
    PT_F_N = 2        # \p{N}
    PT_F_S = 4        # \s  (Unicode White_Space)
    PT_F_UP = 8       # o200k [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]
    PT_F_LO = 16      # o200k [\p{Ll}\p{Lm}\p{Lo}\p{M}]
    PT_F_M = 32       # \p{M}
    PT_F_LNS = 7      # L | N | S; a char with none of these is [^\s\p{L}\p{N}]

# Unicode 16.0.0 general categories + White_Space, as runs (length, class id), varint(len*8+id),
# zlib-compressed, base85.  Class ids: 0 other, 1 Lu/Lt, 2 Ll, 3 Lm/Lo, 4 Mn/Mc/Me, 5 Nd/Nl/No,
# 6 White_Space.
PT_UCD_VERSION = "16.0.0"
PT_UCD_BLOB = (
    "c-pmBZ)jWB73bXd>>TM{d)Im|;n{i~&(TZw5-CHCY*1nuWXl<9?0}i`z-zrukPOV6g4z7RTM|$scW5{tyf}k2UcjppFmqRws"
    "spvoAglMmt0*KjgREL1s~H&F41*Tv@XB_c?2Kj5hNgsr?!R~LIp>~x&hK2Mzc~$!6K?ztL_dIm#@o=C=JDO=HySv$;@g0S-v"
    "#XP`JadakC{J)n!L89sWxg3w0SMfnjU@&)YiRmfcsiP-j^o-V>Jdmo@T%AN$Ch_A*pQ-=f76@hcE-y$+2*pBhSO+E^nQq&o6"
    "lk`l3E;Mjtl$e+Ky673K>xw|tJ|13o``hj~>wuRPumOgz~En!dt?e0jnfO!DY^EcppTfjW^$R=^6a!?06fuY+r8VzwT6Lbhu"
    "<+L{}bJPTY@;V&S|b;Eqjonrl(#ifu%uz5c>d1M;OU|KIY%Yd<D|0??f;00DxOnwP?Vo;YZ=D@_1)MyKKA~!-(kOp0vJSi*<"
    "gT$iA4#`nS6Jyp6pXQMi7_o@c5b+T5xT^=nkcoX5#2ub6$?8QDP01%T5|rlc_&>_F8EVSn=8i7p9Rq@6%m`x0(2%2MXhzUDX"
    "+;bZZSs#8dub$+A{|RWrhEHIq#f6hydga$$u8uiWSe7fTg5g@lx+4?Xd+{KR+gE*{fRq4(M8&?l9OmY0|vRP54r3#gw;-$(H"
    "nK8K9W;}mT)?I(Je90v@jAI$3da>a~Y;l0$mx(GF}2bdL3vVk)@|_o>|ub_3$uWV`;IXRM<7(ZZu|xOm1q4pgnqu3)hx682T"
    "Ka{E#7UDeD-LbRpE188uVvzw<L#R;Zg*rJ24CMh>!YqfQ<&)}E15(6|atMKxMe@fonwvtSO*fSwtp<La4tWs(`(;zGJnH&6F"
    "2+-SKj9@b}=;7(B;*aAFdof>efAj3mz%vy!$cNf?aM65;S1b#y9ri~*!`7g*Tku7!sQU=NC&zMy>t+{J#JTp&6OS(qTooDix"
    "&+q)1$>uC+dL2R{CNz^fAG0mx2mB&iWRvRCPN^rNV^3d0_aXVL?CI{=?g{d0)YJXL+G0=l0SxS?y3#_Ou~!D#te*W&ZSvwe>"
    "~R`DWsO;A;IhM^C>p)2Twr<dSw2a~-%Pk@?2m3sY(v7{kY5Ix9N%8ck5>sR4;BvoP1#g`3x#hyfP3G1xdx!kJK)yl!Q3IO`R"
    "O}35cN9K=TA4tHyQdJzg$-0d_pWix)UFzN%kq@+15r&YgmEf?Ud53npLbL+z8@o9fk-Uv07*B8_2P&LfOFFO*o3@s4uZ|Sv~"
    "hlC97_%`!B0iCO0JIi>uASm$R4KcmnwsacFu`b@c_-Cm&gF`D%XRJ&)EQUX#v0Pw;-CM_1Zv+i4dP?JO=p(B}{OJ4H~0gqPg"
    "H=opw+GWv{i2?pHgC5RaWyuw|BUbzIPGaF#oTWoxcqAe^2-7q2NcseLj1g6m?Ft|CR2m&%ataHI{K~TOBkwJYRCW&gdNr)CY"
    "#-r!!W?3(KyXN1i%PfI4rOZvM)je{xzQB%T4mey4;wXAh>J^x^`aG-bnTDJyi^?r_(wZcsqn{eaCA<tf53!+gol(;ygO}M!T"
    "m_s3+I&X-Xqr`aW$v@g`$`^m=XZ%|q=QT;6XGMVa%^9E9vV^&PLV|%!aKs~6dt_Ie$U=zRh3Nq6|-Jr)-p?yXTF0!#>3cz&*"
    "M+<2nGyVTGG-*7)afM7_KtxTTo+EBi9(!D^5O>N9otK1<B)C#WTk_ScDFO(}KFJSi7}XKt5nprF6#*5i)OpG%azw1RJoMCaq"
    "bP!ZpyXgIOpl14WWH3(nCQC_z`YuB?`nSCx?~O1xv9*+~NA*bOiu$lrw94WEH$jc#aJ2$mFk16-ag!tlPk^z5>4vqk8d1IjR"
    "SQ8_#G0EDLVw7tQG<6@)?aW`ttvvG7SuJhz96OyORoH8D=Y}8$PuUXfDiV2qCR8(kUQ>j%WJcEPrEq2OrqxK`E9rf+f?$vB3"
    "tjmNE85*RT%CSiGt)Jc#0&R>?#Ej_cut=d7a$HLUHzB871FEk{x8UDm3E5wQkUq_F$^{CwA-BLP>@>YLsKVZZ3dpn8_pQzqz"
    "Q)cj)W6Kmv#XFv(NiErHY`IsMVn13^o(0jQ*w#KCFmsLF7Ok}EWz!hNb=z-n<UZnR8mV~icPrDK3t?g?d22q!HbQz0LNEU?^"
    "H$BZg_9A1Q+D_7_H=3gys=4sG!YK#ibM&#TiDY9dX4%9iR9O+-0kW3-zDX=V4yly9QJB6S-6tMC|N9<)7dz*(-}m6)u5WI9("
    "3KsRX;xEtMKl92v?fiF7FAVizugGYi?^1~c4(@DBPrSgEh5mf$y)xILOx$z@_lA6x!6OBRo>u))$BYN&P<vw;b|PFcyvLdi8"
    "_ZW=1}&ZyBBA2js*E6goe|6uYaY_>&=_GGV2Y=S-KGw<%Y4jFQB{rgbDJMaPAfg^Ykyb-<7rB61=HtgO@uyO>S_g0&*O?Fe3"
    ")JC|U%8)nS-ueH(k3s$s@IAmoU)0gRf?p_E>!xB|Qj%g!6d;0Uvq!(pUxVnOg@y!P0GaTd?^KmM6WLwln?$Fi_|5B85P4W*w"
    "p(aj18N(ppmTTO>zx#_1P-_;<nhD``#HNvQDC{HXFpQtKis~1>V1airbP%V9*B6+I!HSxWTNzL@_I_w?e&M`%{)JcYJ7t@1x"
    "}Ene+uU8moC3Sx0=lTUC*-B9E(;P<jgu7n_5*Ss?SVcfoj|Ii<P&Sllv*l{;9$yzn1;$_x=M5)^YO"
)

cdef uint8_t pt_latin1[256]
cdef uint16_t* pt_stage1 = NULL        # 0x1100 entries: block index of each 256-code-point page
cdef uint8_t* pt_stage2 = NULL         # blocks of 256 flag bytes
cdef bint pt_ready = False


cdef int pt_init() except -1:
    global pt_stage1, pt_stage2, pt_ready
    if pt_ready:
        return 0
    import zlib, base64
    cdef bytes raw = zlib.decompress(base64.b85decode(PT_UCD_BLOB))
    cdef const unsigned char* r = raw
    cdef Py_ssize_t rn = len(raw), i = 0, j, k
    cdef uint8_t idmap[8]
    idmap[0] = 0
    idmap[1] = PT_F_L | PT_F_UP
    idmap[2] = PT_F_L | PT_F_LO
    idmap[3] = PT_F_L | PT_F_UP | PT_F_LO
    idmap[4] = PT_F_M | PT_F_UP | PT_F_LO
    idmap[5] = PT_F_N
    idmap[6] = PT_F_S
    idmap[7] = 0
    cdef uint8_t* flat = <uint8_t*>malloc(0x110000)
    if flat == NULL:
        raise MemoryError()
    cdef uint64_t v
    cdef int shift
    cdef Py_ssize_t cp = 0, ln
    cdef uint8_t fl
    cdef uint16_t* st1 = NULL
    cdef uint8_t* st2 = NULL
    try:
        while i < rn:
            v = 0
            shift = 0
            while True:
                v |= (<uint64_t>(r[i] & 0x7F)) << shift
                shift += 7
                i += 1
                if not (r[i - 1] & 0x80):
                    break
            ln = <Py_ssize_t>(v >> 3)
            fl = idmap[v & 7]
            if cp + ln > 0x110000:
                raise ValueError("pretokenize: corrupt Unicode table")
            memset(flat + cp, fl, ln)
            cp += ln
        if cp != 0x110000:
            raise ValueError("pretokenize: corrupt Unicode table")
        # deduplicate the 0x1100 pages of 256 bytes
        st1 = <uint16_t*>malloc(0x1100 * sizeof(uint16_t))
        if st1 == NULL:
            raise MemoryError()
        pages = {}
        order = []
        for j in range(0x1100):
            key = flat[j * 256:(j + 1) * 256]
            b = pages.get(key)
            if b is None:
                b = len(order)
                pages[key] = b
                order.append(j)
            st1[j] = <uint16_t>b
        st2 = <uint8_t*>malloc(len(order) * 256)
        if st2 == NULL:
            free(st1)
            raise MemoryError()
        for k in range(len(order)):
            memcpy(st2 + k * 256, flat + (<Py_ssize_t>order[k]) * 256, 256)
        memcpy(pt_latin1, flat, 256)
        pt_stage1 = st1
        pt_stage2 = st2
        pt_ready = True
    finally:
        free(flat)
    return 0


cdef inline uint8_t pt_cls(pt_char c) noexcept nogil:
    if pt_char is uint8_t:
        return pt_latin1[c]
    else:
        if c < 256:
            return pt_latin1[c]
        if pt_char is uint32_t:
            if c >= 0x110000:
                return 0
        return pt_stage2[((<uint32_t>pt_stage1[c >> 8]) << 8) | (c & 0xFF)]


cdef inline bint pt_is_s(pt_char c) noexcept nogil:
    # case-insensitive 's': s, S, U+017F LATIN SMALL LETTER LONG S (simple case folding)
    if pt_char is uint8_t:
        return c == 115 or c == 83
    else:
        return c == 115 or c == 83 or c == 0x17F


cdef inline Py_ssize_t pt_contraction(const pt_char* s, Py_ssize_t n, Py_ssize_t p, bint o200k) noexcept nogil:
    # cl100k: '(?i:[sdmt]|ll|ve|re)      o200k: (?i:'s|'t|'re|'ve|'m|'ll|'d)   (same language)
    # Returns the end of the contraction starting at p, or -1.  Only ASCII letters and U+017F
    # case-fold onto s d m t l v e r (U+212A KELVIN SIGN folds to k, not used here).
    cdef uint32_t c1, c2
    if p + 1 >= n or s[p] != 39:
        return -1
    c1 = s[p + 1]
    if c1 < 128:
        c1 |= 0x20
        if c1 == 115 or c1 == 116 or c1 == 109 or c1 == 100:      # s t m d
            return p + 2
        if p + 2 < n:
            c2 = s[p + 2]
            if c2 < 128:
                c2 |= 0x20
                if (c1 == 108 and c2 == 108) or (c1 == 118 and c2 == 101) or (c1 == 114 and c2 == 101):
                    return p + 3                                # ll ve re
        return -1
    if pt_is_s(s[p + 1]):
        return p + 2
    return -1


cdef inline Py_ssize_t pt_ws(const pt_char* s, Py_ssize_t n, Py_ssize_t pos, Py_ssize_t* lastnl) noexcept nogil:
    # end of the maximal White_Space run starting at pos (s[pos] is White_Space);
    # *lastnl = index of the last \r or \n in it, or -1
    cdef Py_ssize_t e = pos
    cdef Py_ssize_t ln = -1
    cdef pt_char c
    while e < n:
        c = s[e]
        if c == 32:
            e += 1
            continue
        if c == 10 or c == 13:
            ln = e
        elif not (pt_cls(c) & PT_F_S):
            break
        e += 1
    lastnl[0] = ln
    return e


cdef Py_ssize_t pt_next_cl100k(const pt_char* s, Py_ssize_t n, Py_ssize_t pos) noexcept nogil:
    cdef pt_char c = s[pos]
    cdef uint8_t f = pt_cls(c)
    cdef Py_ssize_t e, lastnl
    # 1. '(?i:[sdmt]|ll|ve|re)
    if c == 39:
        e = pt_contraction(s, n, pos, False)
        if e >= 0:
            return e
    # 2. [^\r\n\p{L}\p{N}]?+\p{L}++ : possessive, so: optional non-(\r \n L N) char, then the
    #    maximal run of L (no backtracking needed: nothing after it can fail).
    if f & PT_F_L:
        e = pos + 1
        while e < n and (pt_cls(s[e]) & PT_F_L):
            e += 1
        return e
    if not (f & PT_F_N) and c != 10 and c != 13 and pos + 1 < n and (pt_cls(s[pos + 1]) & PT_F_L):
        e = pos + 2
        while e < n and (pt_cls(s[e]) & PT_F_L):
            e += 1
        return e
    # 3. \p{N}{1,3}+
    if f & PT_F_N:
        e = pos + 1
        if e < n and (pt_cls(s[e]) & PT_F_N):
            e += 1
            if e < n and (pt_cls(s[e]) & PT_F_N):
                e += 1
        return e
    # 4.  ?[^\s\p{L}\p{N}]++[\r\n]*+
    e = -1
    if not (f & PT_F_LNS):
        e = pos + 1
    elif c == 32 and pos + 1 < n and not (pt_cls(s[pos + 1]) & PT_F_LNS):
        e = pos + 2
    if e >= 0:
        while e < n and not (pt_cls(s[e]) & PT_F_LNS):
            e += 1
        while e < n and (s[e] == 10 or s[e] == 13):
            e += 1
        return e
    # c is White_Space here.  Let [pos, e) be the maximal whitespace run.
    e = pt_ws(s, n, pos, &lastnl)
    # 5. \s++$ : the run reaches the end of the text
    if e == n:
        return n
    # 6. \s*[\r\n] : greedy \s* backtracks to the last \r/\n of the run
    if lastnl >= 0:
        return lastnl + 1
    # 7. \s+(?!\S) : s[e] is non-space, so give back one char (needs a run of >= 2)
    if e - pos >= 2:
        return e - 1
    # 8. \s
    return pos + 1


cdef inline Py_ssize_t pt_o200k_a1(const pt_char* s, Py_ssize_t n, Py_ssize_t p) noexcept nogil:
    # [UP]*[LO]+(?i:'s|...)? at p, where UP = Lu|Lt|Lm|Lo|M and LO = Ll|Lm|Lo|M.
    # UP* takes the maximal run [p, q).  Backtracking tries r = q, q-1, ... for LO+:
    #  - r = q works iff s[q] is in LO (then s[q] is Ll, not UP); LO+ is greedy and only an
    #    optional suffix follows, so it takes the maximal LO run.
    #  - otherwise the largest r < q with s[r] in LO (Lm/Lo/M); LO+ then matches exactly s[r]
    #    (s[r+1] is Lu/Lt or s[q], neither in LO).
    # Returns -1 if no r exists (run of only Lu/Lt not followed by Ll).
    cdef Py_ssize_t q = p, lastlo = -1, e
    cdef uint8_t f
    while q < n:
        f = pt_cls(s[q])
        if not (f & PT_F_UP):
            break
        if f & PT_F_LO:
            lastlo = q
        q += 1
    if q < n and (pt_cls(s[q]) & PT_F_LO):
        e = q + 1
        while e < n and (pt_cls(s[e]) & PT_F_LO):
            e += 1
    elif lastlo >= 0:
        e = lastlo + 1
    else:
        return -1
    q = pt_contraction(s, n, e, True)
    return q if q >= 0 else e


cdef inline Py_ssize_t pt_o200k_a2(const pt_char* s, Py_ssize_t n, Py_ssize_t p) noexcept nogil:
    # [UP]+[LO]*(?i:'s|...)? at p, s[p] in UP (caller checks): all greedy, nothing can fail after.
    cdef Py_ssize_t e = p + 1
    while e < n and (pt_cls(s[e]) & PT_F_UP):
        e += 1
    while e < n and (pt_cls(s[e]) & PT_F_LO):
        e += 1
    p = pt_contraction(s, n, e, True)
    return p if p >= 0 else e


cdef Py_ssize_t pt_next_o200k(const pt_char* s, Py_ssize_t n, Py_ssize_t pos) noexcept nogil:
    cdef pt_char c = s[pos]
    cdef uint8_t f = pt_cls(c), f1
    cdef Py_ssize_t e, lastnl
    cdef bint pre = not (f & (PT_F_L | PT_F_N)) and c != 10 and c != 13   # [^\r\n\p{L}\p{N}]
    # Alternatives 1 and 2 share the greedy optional prefix; the order of attempts is
    #   a1(pos+1) [with prefix], a1(pos), a2(pos+1), a2(pos).
    # a1(x) can only succeed if s[x] is in UP|LO; a2(x) succeeds iff s[x] is in UP.
    if pre and pos + 1 < n:
        f1 = pt_cls(s[pos + 1])
        if f1 & (PT_F_UP | PT_F_LO):
            e = pt_o200k_a1(s, n, pos + 1)
            if e >= 0:
                return e
            # a1(pos+1) failed: s[pos+1] is Lu/Lt.  a1(pos) succeeds iff c is a mark.
            if f & PT_F_M:
                return pt_o200k_a1(s, n, pos)
            return pt_o200k_a2(s, n, pos + 1)
    if f & (PT_F_UP | PT_F_LO):
        e = pt_o200k_a1(s, n, pos)
        if e >= 0:
            return e
        return pt_o200k_a2(s, n, pos)
    # 3. \p{N}{1,3}  (greedy; nothing follows, so same as possessive)
    if f & PT_F_N:
        e = pos + 1
        if e < n and (pt_cls(s[e]) & PT_F_N):
            e += 1
            if e < n and (pt_cls(s[e]) & PT_F_N):
                e += 1
        return e
    # 4.  ?[^\s\p{L}\p{N}]+[\r\n/]*   (the class run is maximal: [\r\n/]* after it always matches)
    e = -1
    if not (f & PT_F_LNS):
        e = pos + 1
    elif c == 32 and pos + 1 < n and not (pt_cls(s[pos + 1]) & PT_F_LNS):
        e = pos + 2
    if e >= 0:
        while e < n and not (pt_cls(s[e]) & PT_F_LNS):
            e += 1
        while e < n and (s[e] == 10 or s[e] == 13 or s[e] == 47):
            e += 1
        return e
    # c is White_Space; [pos, e) the maximal whitespace run
    e = pt_ws(s, n, pos, &lastnl)
    # 5. \s*[\r\n]+ : \s* backtracks to the last \r/\n of the run; [\r\n]+ then matches just it
    if lastnl >= 0:
        return lastnl + 1
    # 6. \s+(?!\S)
    if e == n:
        return n
    if e - pos >= 2:
        return e - 1
    # 7. \s+  (run of length 1 here)
    return pos + 1


cdef Py_ssize_t pt_next(int kind, const pt_char* s, Py_ssize_t n, Py_ssize_t pos) noexcept nogil:
    if kind == PT_O200K:
        return pt_next_o200k(s, n, pos)
    return pt_next_cl100k(s, n, pos)


def _pretokenize(str text, int kind):
    """Split text into tiktoken pre-tokenizer pieces (testing helper; no lone surrogates)."""
    if kind != PT_CL100K and kind != PT_O200K:
        raise ValueError("kind must be PT_CL100K (1) or PT_O200K (2)")
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(text), pos = 0, e
    cdef int k = PyUnicode_KIND(text)
    cdef void* d = PyUnicode_DATA(text)
    cdef list out = []
    while pos < n:
        if k == PyUnicode_1BYTE_KIND:
            e = pt_next(kind, <const uint8_t*>d, n, pos)
        elif k == PyUnicode_2BYTE_KIND:
            e = pt_next(kind, <const uint16_t*>d, n, pos)
        else:
            e = pt_next(kind, <const uint32_t*>d, n, pos)
        out.append(text[pos:e])
        pos = e
    return out
