// edgec_run: the C++ runner of an edgec bundle. This file is the same in every bundle: the model's signature,
// entry function, files, device and threads are read from manifest.json at run time (docs/bundle-format.md).
//
// usage: edgec_run [-d BUNDLE_DIR] [-o OUT_DIR] [-n REPEAT] [-w WARMUP] [-t THREADS] [-v] [--no-verify] [IN0.npy ...]
//        edgec_run --stream [-d BUNDLE_DIR] [-o OUT_DIR] [-t THREADS] [-v] [--no-verify] STEP0_IN0.npy ... STEPK_INn.npy
//   Inputs are .npy files in the manifest's input order; with none, the bundle's sample inputs are used.
//   Output i is written as OUT_DIR/<outputs[i].file>. Runs the model once ("first"), WARMUP more times
//   untimed, then REPEAT timed times, and prints one timing line (with the process's peak resident memory).
//   --stream (a model with "states"): the files are the inputs other than the state inputs, step after step; the
//   state starts from the manifest's initial values and each step's state outputs are the next step's state
//   inputs. Step k's outputs are written to OUT_DIR/k/; the timing line's first and median are over the steps.
//   THREADS (default: the manifest's target.device.threads, at most this machine's cores; 0 there means TVM's
//   default) sets TVM_NUM_THREADS.
//   Before loading anything it checks the bundle as the spec's "What a runner checks" says: manifest fields,
//   paths, the exact file set, every size and (unless --no-verify) every sha256.
//   Exit codes: 0 ok; 2 bad command line, input or bundle; 1 error inside the TVM runtime. Errors are one
//   line on stderr; the TVM runtime's own log messages are dropped unless -v is given.
//
// Security model: the checks make a bundle tamper-evident against the manifest, not authentic (whoever can
// edit the manifest can re-hash). The library and params bytes that are hashed are the bytes that are loaded:
// each is read once into memory, the library is handed to the dynamic loader through an anonymous memfd and
// the params are decoded from memory, so swapping a file after the check has no effect. Still trusted: the
// bundle directory itself and the directories inside it (nested files are checked, then re-opened by path),
// this binary, the TVM runtime libraries it links, and other processes of the same user (who could ptrace us).
//
// Built only against the tvm-ffi headers (the wheel's tvm/runtime headers need files it does not ship) and
// linked with libtvm_runtime.so + libtvm_ffi.so.
#include <dlfcn.h>
#include <dlpack/dlpack.h>
#include <fcntl.h>
#include <getopt.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace ffi = tvm::ffi;
namespace fs = std::filesystem;

namespace {

constexpr int kFormatVersion = 3;
constexpr size_t kMaxManifestBytes = 16 << 20;  // far above any real manifest; bounds the parser's input
constexpr int kMaxJsonDepth = 32;               // the manifest nests 5 deep; bounds the reader's recursion
constexpr uint32_t kMaxNpyHeader = 1 << 16;     // numpy itself refuses headers over 10000 bytes by default
constexpr size_t kMaxDims = 32;                 // numpy's NPY_MAXDIMS

// Where edgec_run's own messages go: stderr, kept aside while the TVM runtime's log is silenced (see Run).
int g_stderr = STDERR_FILENO;

// A message as one printable line: it can quote names and bytes taken from the manifest, an input file or the
// command line. Control characters and bytes that are not valid UTF-8 are shown as \xNN.
void Message(const char* kind, const std::string& text) {
  std::string line = std::string("edgec_run: ") + kind + ": ";
  for (size_t i = 0; i < text.size();) {
    unsigned char c = static_cast<unsigned char>(text[i]);
    size_t n = c < 0x80 ? 1 : c >= 0xC2 && c < 0xE0 ? 2 : c >= 0xE0 && c < 0xF0 ? 3 : c >= 0xF0 && c < 0xF5 ? 4 : 0;
    // the second byte's range excludes overlong forms, UTF-16 surrogates and code points above U+10FFFF
    unsigned char lo = c == 0xE0 ? 0xA0 : c == 0xF0 ? 0x90 : 0x80, hi = c == 0xED ? 0x9F : c == 0xF4 ? 0x8F : 0xBF;
    bool ok = n == 1 ? c >= 0x20 && c != 0x7f : n > 0 && i + n <= text.size();
    for (size_t k = 1; ok && k < n; ++k) {
      unsigned char b = static_cast<unsigned char>(text[i + k]);
      ok = k == 1 ? b >= lo && b <= hi : (b & 0xC0) == 0x80;
    }
    if (ok) {
      line.append(text, i, n);
      i += n;
    } else {
      char hex[5];
      std::snprintf(hex, sizeof(hex), "\\x%02x", c);
      line += hex;
      ++i;
    }
  }
  line += '\n';
  if (write(g_stderr, line.data(), line.size()) < 0) return;  // nowhere left to report it
}

// A bad command line, input file or bundle: one line on stderr, exit code 2.
struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---------------------------------------------------------------------------------------------------------
// SHA-256 (FIPS 180-4), small and self-contained so the runner needs nothing beyond the TVM runtime.
class Sha256 {
 public:
  void Update(const unsigned char* p, size_t n) {
    total_ += n;
    while (n > 0) {
      size_t take = std::min(n, sizeof(buf_) - used_);
      std::memcpy(buf_ + used_, p, take);
      used_ += take, p += take, n -= take;
      if (used_ == sizeof(buf_)) Block(buf_), used_ = 0;
    }
  }
  std::string HexDigest() {
    uint64_t bits = total_ * 8;
    unsigned char pad[72] = {0x80};
    Update(pad, 1 + (119 - used_) % 64);  // up to 56 bytes mod 64, leaving room for the length
    for (int i = 7; i >= 0; --i) pad[7 - i] = static_cast<unsigned char>(bits >> (8 * i));
    Update(pad, 8);
    std::string hex;
    for (uint32_t v : h_)
      for (int s = 28; s >= 0; s -= 4) hex += "0123456789abcdef"[(v >> s) & 15];
    return hex;
  }

 private:
  static uint32_t Rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
  void Block(const unsigned char* p) {
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
    uint32_t w[64], s[8];
    for (int i = 0; i < 16; ++i)
      w[i] = uint32_t(p[4 * i]) << 24 | uint32_t(p[4 * i + 1]) << 16 | uint32_t(p[4 * i + 2]) << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = Rotr(w[i - 15], 7) ^ Rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = Rotr(w[i - 2], 17) ^ Rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    std::copy(h_, h_ + 8, s);
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = s[7] + (Rotr(s[4], 6) ^ Rotr(s[4], 11) ^ Rotr(s[4], 25)) + ((s[4] & s[5]) ^ (~s[4] & s[6])) +
                    k[i] + w[i];
      uint32_t t2 = (Rotr(s[0], 2) ^ Rotr(s[0], 13) ^ Rotr(s[0], 22)) + ((s[0] & s[1]) ^ (s[0] & s[2]) ^ (s[1] & s[2]));
      std::copy_backward(s, s + 7, s + 8);
      s[4] += t1, s[0] = t1 + t2;
    }
    for (int i = 0; i < 8; ++i) h_[i] += s[i];
  }
  uint32_t h_[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  unsigned char buf_[64];
  size_t used_ = 0;
  uint64_t total_ = 0;
};

// ---------------------------------------------------------------------------------------------------------
// Files

// An open file descriptor that closes itself.
struct Fd {
  int fd;
  explicit Fd(int f) : fd(f) {}
  Fd(Fd&& other) noexcept : fd(other.fd) { other.fd = -1; }
  Fd(const Fd&) = delete;
  ~Fd() {
    if (fd >= 0) close(fd);
  }
};

// Opens a regular file without following a symlink in its last component; `size` gets its size.
Fd OpenRegular(const std::string& path, const std::string& what, uint64_t* size) {
  Fd f(open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  struct stat st {};
  if (f.fd < 0) throw InputError("cannot open " + what + " " + path + " (" + std::strerror(errno) + ")");
  if (fstat(f.fd, &st) != 0 || !S_ISREG(st.st_mode)) throw InputError(what + " " + path + " is not a regular file");
  *size = static_cast<uint64_t>(st.st_size);
  return f;
}

// Reads exactly n bytes; false at end of file.
bool ReadExact(int fd, void* dst, size_t n) {
  for (char* p = static_cast<char*>(dst); n > 0;) {
    ssize_t got = read(fd, p, std::min<size_t>(n, 1 << 30));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;
    p += got, n -= static_cast<size_t>(got);
  }
  return true;
}

// The rest of an open file, which must be exactly `size` bytes long.
std::string ReadRest(const Fd& f, uint64_t size, const std::string& path) {
  std::string bytes(size, '\0');
  char extra;
  if (!ReadExact(f.fd, bytes.data(), size) || read(f.fd, &extra, 1) != 0)
    throw InputError(path + " changed size while it was read");
  return bytes;
}

// ---------------------------------------------------------------------------------------------------------
// Data types and tensors

struct DType {
  const char* name;
  char kind;  // numpy kind: f, i, u, b
  int bytes;
  DLDataType dl;
};
const DType kDTypes[] = {
    {"float32", 'f', 4, {kDLFloat, 32, 1}}, {"float16", 'f', 2, {kDLFloat, 16, 1}},
    {"float64", 'f', 8, {kDLFloat, 64, 1}}, {"int8", 'i', 1, {kDLInt, 8, 1}},
    {"int16", 'i', 2, {kDLInt, 16, 1}},     {"int32", 'i', 4, {kDLInt, 32, 1}},
    {"int64", 'i', 8, {kDLInt, 64, 1}},     {"uint8", 'u', 1, {kDLUInt, 8, 1}},
    {"uint16", 'u', 2, {kDLUInt, 16, 1}},   {"uint32", 'u', 4, {kDLUInt, 32, 1}},
    {"uint64", 'u', 8, {kDLUInt, 64, 1}},   {"bool", 'b', 1, {kDLBool, 8, 1}},
};

const DType* DTypeByDL(DLDataType t) {
  if (t.code == kDLUInt && t.bits == 1 && t.lanes == 1) t = {kDLBool, 8, 1};  // older TVM spelling of bool
  for (const DType& d : kDTypes)
    if (d.dl.code == t.code && d.dl.bits == t.bits && d.dl.lanes == t.lanes) return &d;
  return nullptr;
}

// An output dimension the manifest gives as null: known only at run time (the boxes NonMaxSuppression keeps).
constexpr int64_t kRunTimeDim = -1;

std::string ShapeStr(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i)
    s += (i ? ", " : "") + (shape[i] == kRunTimeDim ? std::string("?") : std::to_string(shape[i]));
  return s + "]";
}

// Whether a tensor's shape is the manifest's, a run-time dimension matching any size.
bool Fits(const std::vector<int64_t>& shape, const std::vector<int64_t>& dims) {
  if (shape.size() != dims.size()) return false;
  for (size_t i = 0; i < shape.size(); ++i)
    if (dims[i] != kRunTimeDim && dims[i] != shape[i]) return false;
  return true;
}

struct TensorSpec {
  std::string name, file;
  std::vector<int64_t> shape;
  const DType* dtype;
  size_t nbytes;  // checked for overflow when the manifest is read
};

struct CPUAlloc {
  void AllocData(DLTensor* t) {
    // aligned_alloc needs a size that is a multiple of the alignment (and non-zero)
    t->data = std::aligned_alloc(64, std::max<size_t>(64, (ffi::GetDataSize(*t) + 63) / 64 * 64));
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

// ---------------------------------------------------------------------------------------------------------
// .npy files

// The header dict numpy writes, e.g. {'descr': '<f4', 'fortran_order': False, 'shape': (1, 3), }, parsed
// strictly: exactly these three keys, quoted strings, True/False, a tuple of at most kMaxDims plain integers.
class NpyHeaderParser {
 public:
  NpyHeaderParser(const std::string& text, const std::string& path) : s_(text), path_(path) {}

  void Parse(std::string* descr, bool* fortran, std::vector<int64_t>* shape) {
    std::set<std::string> seen;
    Expect('{');
    while (Skip(), Peek() != '}') {
      std::string key = Quoted();
      Skip(), Expect(':'), Skip();
      if (!seen.insert(key).second) Fail("key '" + key + "' appears twice");
      if (key == "descr") {
        *descr = Quoted();
      } else if (key == "fortran_order") {
        if (Word("True")) *fortran = true;
        else if (!Word("False")) Fail("fortran_order is not True or False");
      } else if (key == "shape") {
        *shape = Tuple();
      } else {
        Fail("unexpected key '" + key + "'");
      }
      Skip();
      if (Peek() != '}') Expect(',');
    }
    ++i_;
    Skip();
    if (i_ != s_.size()) Fail("text after the header dict");
    if (seen.size() != 3) Fail("the header needs 'descr', 'fortran_order' and 'shape'");
  }

 private:
  [[noreturn]] void Fail(const std::string& why) const {
    throw InputError(path_ + ": not a valid .npy file (" + why + ")");
  }
  int Peek() const { return i_ < s_.size() ? static_cast<unsigned char>(s_[i_]) : -1; }
  void Skip() {
    while (Peek() == ' ' || Peek() == '\n') ++i_;
  }
  void Expect(char c) {
    if (Peek() != c) Fail(std::string("expected '") + c + "' in the header");
    ++i_;
  }
  bool Word(const char* w) {
    size_t n = std::strlen(w);
    if (s_.compare(i_, n, w) != 0) return false;
    i_ += n;
    return true;
  }
  std::string Quoted() {
    int q = Peek();
    if (q != '\'' && q != '"') Fail("expected a quoted string in the header");
    size_t end = s_.find(static_cast<char>(q), i_ + 1);
    if (end == std::string::npos) Fail("unterminated string in the header");
    std::string v = s_.substr(i_ + 1, end - i_ - 1);
    i_ = end + 1;
    return v;
  }
  std::vector<int64_t> Tuple() {
    std::vector<int64_t> dims;
    Expect('(');
    while (Skip(), Peek() != ')') {
      int64_t v = 0;
      size_t digits = 0;
      for (; Peek() >= '0' && Peek() <= '9'; ++i_, ++digits) {
        if (digits == 18) Fail("a dimension in 'shape' is too large");  // 18 digits always fit in int64
        v = v * 10 + (s_[i_] - '0');
      }
      if (digits == 0) Fail("'shape' holds something other than non-negative integers");
      if (dims.size() == kMaxDims) Fail("'shape' has more than " + std::to_string(kMaxDims) + " dimensions");
      dims.push_back(v);
      Skip();
      if (Peek() != ')') Expect(',');
    }
    ++i_;
    return dims;
  }

  const std::string& s_;
  const std::string& path_;
  size_t i_ = 0;
};

// Reads a little-endian, C-order .npy file (format versions 1-3) that must match `spec`. Nothing is allocated
// before the header has been checked against the spec and the file's size against the spec's byte count.
ffi::Tensor ReadNpy(const std::string& path, const TensorSpec& spec) {
  uint64_t file_size;
  Fd f = OpenRegular(path, "input file", &file_size);
  unsigned char prefix[12];
  if (!ReadExact(f.fd, prefix, 8) || std::memcmp(prefix, "\x93NUMPY", 6) != 0)
    throw InputError(path + ": not a .npy file");
  int major = prefix[6];
  if (major < 1 || major > 3) throw InputError(path + ": unsupported .npy format version " + std::to_string(major));
  int len_bytes = major == 1 ? 2 : 4;
  if (!ReadExact(f.fd, prefix + 8, len_bytes)) throw InputError(path + ": truncated .npy header");
  uint32_t header_len = 0;
  for (int i = len_bytes - 1; i >= 0; --i) header_len = header_len << 8 | prefix[8 + i];
  uint64_t data_offset = 8 + len_bytes + uint64_t{header_len};
  if (header_len > kMaxNpyHeader) throw InputError(path + ": .npy header of " + std::to_string(header_len) + " bytes is too long");
  if (data_offset > file_size) throw InputError(path + ": truncated .npy header");
  std::string header(header_len, '\0');
  if (!ReadExact(f.fd, header.data(), header_len)) throw InputError(path + ": truncated .npy header");

  std::string descr;
  bool fortran = false;
  std::vector<int64_t> shape;
  NpyHeaderParser(header, path).Parse(&descr, &fortran, &shape);
  if (fortran) throw InputError(path + ": Fortran-order arrays are not supported (save with np.ascontiguousarray)");
  const DType* dtype = nullptr;
  for (const DType& d : kDTypes)
    if (descr.size() >= 2 && descr.substr(1) == d.kind + std::to_string(d.bytes) &&
        (descr[0] == '<' || (descr[0] == '|' && d.bytes == 1)))
      dtype = &d;
  if (dtype == nullptr)
    throw InputError(path + ": unsupported dtype '" + descr + "' (need little-endian f2/f4/f8/i1/i2/i4/i8/u1/u2/u4/u8/b1)");
  if (shape != spec.shape)
    throw InputError("input '" + spec.name + "' (" + path + ") has shape " + ShapeStr(shape) + ", the model expects " +
                     ShapeStr(spec.shape));
  if (dtype != spec.dtype)
    throw InputError("input '" + spec.name + "' (" + path + ") has dtype " + dtype->name + ", the model expects " +
                     spec.dtype->name);
  if (file_size - data_offset != spec.nbytes)
    throw InputError(path + ": data size does not match the header's shape and dtype");

  ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::ShapeView(shape.data(), shape.size()), dtype->dl,
                                           DLDevice{kDLCPU, 0});
  if (!ReadExact(f.fd, t.data_ptr(), spec.nbytes)) throw InputError(path + ": changed size while it was read");
  return t;
}

// Writes a CPU tensor as a version-1 .npy file.
void WriteNpy(const std::string& path, const ffi::Tensor& t, const DType* dtype) {
  std::string dims;
  for (int64_t d : t.shape()) dims += std::to_string(d) + ", ";
  if (t.ndim() > 1) dims.resize(dims.size() - 2);  // (n,) keeps its comma, () and (a, b) do not
  std::string header = std::string("{'descr': '") + (dtype->bytes == 1 ? '|' : '<') + dtype->kind +
                       std::to_string(dtype->bytes) + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  header.append(63 - (10 + header.size()) % 64, ' ').push_back('\n');  // pad magic+header to 64 bytes
  uint16_t len = static_cast<uint16_t>(header.size());
  std::string bytes = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0, static_cast<char>(len & 0xff), static_cast<char>(len >> 8)};
  bytes += header;
  const DLTensor* dl = t.GetDLTensorPtr();
  bytes.append(static_cast<const char*>(dl->data) + dl->byte_offset, ffi::GetDataSize(*dl));
  std::FILE* f = std::fopen(path.c_str(), "wb");
  bool ok = f != nullptr && std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  if (f != nullptr) ok = std::fclose(f) == 0 && ok;
  if (!ok) throw InputError("cannot write " + path + " (" + std::strerror(errno) + ")");
}

// ---------------------------------------------------------------------------------------------------------
// manifest.json

using JsonObject = ffi::Map<ffi::Any, ffi::Any>;
using JsonArray = ffi::Array<ffi::Any>;

// A strict JSON reader (RFC 8259) producing tvm-ffi values: objects, arrays, strings, int64 or double numbers,
// booleans and None. tvm-ffi's own json::Parse lets the last of two equal keys win silently (a second "params"
// would replace the first) and recurses without a depth limit; this reader refuses both, and NaN/Infinity.
class JsonReader {
 public:
  explicit JsonReader(const std::string& text) : s_(text) {}

  ffi::Any Document() {
    ffi::Any v = Value(0);
    Skip();
    if (i_ != s_.size()) Fail("text after the JSON value");
    return v;
  }

 private:
  [[noreturn]] void Fail(const std::string& why) const {
    throw InputError("manifest.json is not valid JSON (" + why + " at byte " + std::to_string(i_) + ")");
  }
  void Skip() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  bool Eat(char c) {
    Skip();
    if (i_ >= s_.size() || s_[i_] != c) return false;
    ++i_;
    return true;
  }
  void Expect(char c) {
    if (!Eat(c)) Fail(std::string("expected '") + c + "'");
  }
  bool Word(const char* w) {
    size_t n = std::strlen(w);
    if (s_.compare(i_, n, w) != 0) return false;
    i_ += n;
    return true;
  }

  ffi::Any Value(int depth) {
    if (depth > kMaxJsonDepth) Fail("nested deeper than " + std::to_string(kMaxJsonDepth));
    Skip();
    if (Eat('{')) {
      std::vector<std::pair<ffi::Any, ffi::Any>> items;
      std::set<std::string> keys;
      if (!Eat('}')) {
        do {
          Skip();
          std::string key = String();
          if (!keys.insert(key).second) Fail("duplicate key \"" + key + "\"");
          Expect(':');
          items.emplace_back(ffi::String(key), Value(depth + 1));
        } while (Eat(','));
        Expect('}');
      }
      return JsonObject(items.begin(), items.end());
    }
    if (Eat('[')) {
      std::vector<ffi::Any> items;
      if (!Eat(']')) {
        do items.push_back(Value(depth + 1));
        while (Eat(','));
        Expect(']');
      }
      return JsonArray(items.begin(), items.end());
    }
    if (i_ < s_.size() && s_[i_] == '"') return ffi::String(String());
    if (Word("true")) return true;
    if (Word("false")) return false;
    if (Word("null")) return ffi::Any();
    return Number();
  }

  std::string String() {
    if (i_ >= s_.size() || s_[i_] != '"') Fail("expected a string");
    std::string out;
    for (++i_; i_ < s_.size();) {
      unsigned char c = static_cast<unsigned char>(s_[i_++]);
      if (c == '"') return out;
      if (c < 0x20) Fail("control character in a string");
      if (c != '\\') {
        out += static_cast<char>(c);
      } else if (i_ < s_.size() && s_[i_] == 'u') {
        ++i_;
        uint32_t cp = Hex4();
        if (cp >= 0xD800 && cp < 0xDC00 && Word("\\u")) {  // a UTF-16 surrogate pair
          uint32_t low = Hex4();
          if (low < 0xDC00 || low > 0xDFFF) Fail("unpaired surrogate in a \\u escape");
          cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
        } else if (cp >= 0xD800 && cp < 0xE000) {
          Fail("unpaired surrogate in a \\u escape");
        }
        AppendUtf8(cp, &out);
      } else {
        switch (i_ < s_.size() ? s_[i_++] : '\0') {
          case '"': out += '"'; break;
          case '\\': out += '\\'; break;
          case '/': out += '/'; break;
          case 'b': out += '\b'; break;
          case 'f': out += '\f'; break;
          case 'n': out += '\n'; break;
          case 'r': out += '\r'; break;
          case 't': out += '\t'; break;
          default: Fail("bad escape in a string");
        }
      }
    }
    Fail("unterminated string");
  }
  uint32_t Hex4() {
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k, ++i_) {
      int c = i_ < s_.size() ? static_cast<unsigned char>(s_[i_]) : -1;
      int d = std::isdigit(c) ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
      if (d < 0) Fail("bad \\u escape");
      v = v << 4 | static_cast<uint32_t>(d);
    }
    return v;
  }
  static void AppendUtf8(uint32_t cp, std::string* out) {
    if (cp < 0x80) {
      *out += static_cast<char>(cp);
      return;
    }
    static const unsigned char kLead[] = {0, 0xC0, 0xE0, 0xF0};  // 110xxxxx, 1110xxxx, 11110xxx
    int extra = cp < 0x800 ? 1 : cp < 0x10000 ? 2 : 3;
    *out += static_cast<char>(kLead[extra] | (cp >> (6 * extra)));
    for (int k = extra - 1; k >= 0; --k) *out += static_cast<char>(0x80 | ((cp >> (6 * k)) & 0x3F));
  }

  // -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?: an int64 when it is an integer that fits, else a double.
  ffi::Any Number() {
    size_t start = i_;
    auto digits = [&] {
      size_t from = i_;
      while (i_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i_]))) ++i_;
      if (i_ == from) Fail("expected a value");
    };
    Word("-");
    if (!Word("0")) digits();
    bool integer = true;
    if (Word(".")) integer = false, digits();
    if (Word("e") || Word("E")) {
      integer = false;
      if (!Word("+")) Word("-");
      digits();
    }
    std::string text = s_.substr(start, i_ - start);
    errno = 0;
    if (integer) {
      long long v = std::strtoll(text.c_str(), nullptr, 10);
      if (errno == 0) return static_cast<int64_t>(v);
    }
    return std::strtod(text.c_str(), nullptr);
  }

  const std::string& s_;
  size_t i_ = 0;
};

// Spec rule 2: relative, normalised POSIX path, no backslash (and no NUL, which would cut the path short).
bool IsCleanRelativePath(const std::string& p) {
  if (p.empty() || p[0] == '/' || p.find('\\') != std::string::npos || p.find('\0') != std::string::npos)
    return false;
  for (size_t b = 0; b <= p.size();) {
    size_t e = std::min(p.find('/', b), p.size());
    std::string part = p.substr(b, e - b);
    if (part.empty() || part == "." || part == "..") return false;
    b = e + 1;
  }
  return true;
}

// Characters allowed after the first one of a command name and in a tensor file name's NAME part.
bool IsNameChar(unsigned char c, const char* extra) {
  return std::isalnum(c) || (c != '\0' && std::strchr(extra, c) != nullptr);
}

// Tensor file names: ^[0-9]+-[A-Za-z0-9._-]*\.npy$
bool IsTensorFileName(const std::string& f) {
  size_t dash = f.find('-');
  if (dash == 0 || dash == std::string::npos || f.size() < dash + 5 || f.compare(f.size() - 4, 4, ".npy") != 0)
    return false;
  for (size_t i = 0; i < f.size(); ++i) {
    unsigned char c = static_cast<unsigned char>(f[i]);
    if (!(i < dash ? std::isdigit(c) : IsNameChar(c, "._-"))) return false;
  }
  return true;
}

// A value in the parsed manifest with its field path, for type checks whose messages name the field.
struct Field {
  ffi::Any v;
  std::string path;

  [[noreturn]] void Fail(const std::string& what) const {
    throw InputError("manifest.json: field '" + path + "' " + what);
  }
  std::string Child(const std::string& key) const { return path.empty() ? key : path + "." + key; }
  bool IsNull() const { return v.type_index() == ffi::TypeIndex::kTVMFFINone; }
  JsonObject Obj() const {
    if (auto o = v.as<JsonObject>()) return *o;
    Fail("is not an object");
  }
  std::optional<Field> Opt(const char* key) const {
    JsonObject o = Obj();
    auto it = o.find(ffi::String(key));
    if (it == o.end()) return std::nullopt;
    return Field{(*it).second, Child(key)};
  }
  Field operator[](const char* key) const {
    if (auto f = Opt(key)) return *f;
    throw InputError("manifest.json: field '" + Child(key) + "' is missing");
  }
  std::vector<Field> Items() const {
    auto a = v.as<JsonArray>();
    if (!a) Fail("is not a list");
    std::vector<Field> items;
    for (size_t i = 0; i < a->size(); ++i) items.push_back({(*a)[i], path + "[" + std::to_string(i) + "]"});
    return items;
  }
  std::string Str() const {
    if (auto s = v.as<ffi::String>()) return std::string(*s);
    Fail("is not a string");
  }
  int64_t Count() const {
    auto i = v.as<int64_t>();
    if (!i || *i < 0) Fail("is not a non-negative integer");
    return *i;
  }
  void Number() const {
    auto d = v.as<double>();
    if (!(d ? std::isfinite(*d) && *d >= 0 : v.as<int64_t>().value_or(-1) >= 0)) Fail("is not a finite non-negative number");
  }
  std::string Hex64() const {
    std::string s = Str();
    if (s.size() != 64 || s.find_first_not_of("0123456789abcdef") != std::string::npos) Fail("is not a sha256 hex digest");
    return s;
  }
  std::string RelPath() const {
    std::string s = Str();
    if (!IsCleanRelativePath(s)) Fail("is not a relative, normalised path inside the bundle");
    return s;
  }
  // Spec rule 6: what a runner may execute is a bare command name, the emulator's sysroot an absolute path.
  void Command() const {
    std::string s = Str();
    for (size_t i = 0; i < s.size(); ++i)
      if (!IsNameChar(static_cast<unsigned char>(s[i]), i ? "._+-" : "")) Fail("is not a bare command name");
    if (s.empty()) Fail("is not a bare command name");
  }
  void AbsPath() const {
    std::string s = Str();
    if (s != "/" && (s.empty() || s[0] != '/' || !IsCleanRelativePath(s.substr(1))))
      Fail("is not an absolute, normalised path");
  }
};

// DLPack device types of the spec's target.device.kind values.
const std::map<std::string, DLDeviceType> kDevices = {{"cpu", kDLCPU},      {"cuda", kDLCUDA},   {"opencl", kDLOpenCL},
                                                      {"vulkan", kDLVulkan}, {"metal", kDLMetal}, {"rocm", kDLROCM}};

struct FileEntry {
  std::string sha256;
  uint64_t size;
};

// A streaming model's state: the output fed back into the input from one step to the next.
struct StatePair {
  size_t input, output;  // indices into Manifest::inputs and Manifest::outputs
};

struct Manifest {
  std::string entry, library, params;  // params is empty when the manifest's "params" is null
  std::string initial_states;  // empty when the manifest has no "states"
  std::vector<StatePair> states;
  std::string load;  // empty when "load" is null: the entry takes the weights themselves
  std::vector<std::string> shared_libs;  // loaded before the library, in this order
  std::vector<std::string> cpu_features;  // LLVM's names of the extensions the library may use
  std::vector<TensorSpec> inputs, outputs;
  std::vector<std::string> sample_inputs;  // empty when "sample" is null
  std::string device_kind;
  DLDevice device;
  int threads;  // 0: the TVM runtime's default
  std::map<std::string, FileEntry> files;
};

// Inputs have every dimension fixed; outputs (`run_time_dims`) may have null ones.
std::vector<TensorSpec> ReadSpecs(const Field& list, bool run_time_dims) {
  std::vector<TensorSpec> specs;
  std::set<std::string> names, files;
  for (const Field& t : list.Items()) {
    TensorSpec s{t["name"].Str(), t["file"].Str(), {}, nullptr, 0};
    if (!IsTensorFileName(s.file)) t["file"].Fail("is not a tensor file name (N-NAME.npy)");
    if (!names.insert(s.name).second || !files.insert(s.file).second)
      list.Fail("has two tensors with the same name or file");
    std::string dtype = t["dtype"].Str();
    for (const DType& d : kDTypes)
      if (dtype == d.name) s.dtype = &d;
    if (s.dtype == nullptr) t["dtype"].Fail("is '" + dtype + "', not a dtype this runner supports");
    uint64_t n = static_cast<uint64_t>(s.dtype->bytes);
    for (const Field& d : t["shape"].Items()) {
      s.shape.push_back(run_time_dims && d.IsNull() ? kRunTimeDim : d.Count());
      if (s.shape.size() > kMaxDims) t["shape"].Fail("has more than " + std::to_string(kMaxDims) + " dimensions");
      if (s.shape.back() == kRunTimeDim) continue;  // nbytes is read for inputs only
      if (__builtin_mul_overflow(n, static_cast<uint64_t>(s.shape.back()), &n) || n > SIZE_MAX / 2)
        t["shape"].Fail("describes a tensor too large to hold");
    }
    s.nbytes = static_cast<size_t>(n);
    specs.push_back(std::move(s));
  }
  return specs;
}

// The manifest's cpu_features this machine's CPU lacks, comma separated (run.py's cpu_features_lacking, with the
// same tables): x86 /proc/cpuinfo flags, Arm hwcaps. A feature in neither table is not checked.
std::string CpuFeaturesLacking(const std::vector<std::string>& features) {
  std::string lacking;
  auto lack = [&](const std::string& f) { lacking += (lacking.empty() ? "" : ", ") + f; };
#if defined(__x86_64__)
  static const std::map<std::string, std::string> kFlags = {
      {"sse", "sse"}, {"sse2", "sse2"}, {"ssse3", "ssse3"}, {"sse4a", "sse4a"}, {"avx", "avx"}, {"avx2", "avx2"},
      {"fma", "fma"}, {"f16c", "f16c"}, {"bmi2", "bmi2"}, {"popcnt", "popcnt"}, {"movbe", "movbe"}, {"gfni", "gfni"},
      {"avx512f", "avx512f"}, {"avx512bw", "avx512bw"}, {"avx512cd", "avx512cd"}, {"avx512dq", "avx512dq"},
      {"avx512vl", "avx512vl"}, {"avx512ifma", "avx512ifma"}, {"avx512vbmi", "avx512vbmi"}, {"sse3", "pni"},
      {"sse4.1", "sse4_1"}, {"sse4.2", "sse4_2"}, {"bmi", "bmi1"}, {"lzcnt", "abm"}, {"avx512vnni", "avx512_vnni"},
      {"avx512bf16", "avx512_bf16"}, {"avx512bitalg", "avx512_bitalg"}, {"avx512vbmi2", "avx512_vbmi2"},
      {"avx512vpopcntdq", "avx512_vpopcntdq"}, {"avx512fp16", "avx512_fp16"}, {"avxvnni", "avx_vnni"},
      {"amx-tile", "amx_tile"}, {"amx-int8", "amx_int8"}, {"amx-bf16", "amx_bf16"}};
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::set<std::string> flags;
  for (std::string line; std::getline(cpuinfo, line);) {
    if (line.rfind("flags", 0) != 0) continue;
    std::istringstream words(line.substr(line.find(':') + 1));
    for (std::string w; words >> w;) flags.insert(w);
    break;
  }
  if (flags.empty()) return "";  // no /proc/cpuinfo: nothing to tell
  for (const std::string& f : features) {
    auto it = kFlags.find(f);
    if (it != kFlags.end() && !flags.count(it->second)) lack(f);
  }
#elif defined(__aarch64__)
  static const std::map<std::string, std::pair<unsigned long, int>> kHwcaps = {  // (AT_HWCAP or AT_HWCAP2, bit)
      {"neon", {16, 1}}, {"lse", {16, 8}}, {"fullfp16", {16, 10}}, {"rdm", {16, 12}}, {"rcpc", {16, 15}},
      {"dotprod", {16, 20}}, {"sve", {16, 22}}, {"fp16fml", {16, 23}}, {"sve2", {26, 1}}, {"i8mm", {26, 13}},
      {"bf16", {26, 14}}, {"sme", {26, 23}}};
  for (const std::string& f : features) {
    auto it = kHwcaps.find(f);
    if (it != kHwcaps.end() && !(getauxval(it->second.first) >> it->second.second & 1)) lack(f);
  }
#else
  (void)features, (void)lack;
#endif
  return lacking;
}

// Parses manifest.json and checks every field of the spec with its type (the same schema as run.py's);
// returns what the runner uses. Unknown fields are allowed.
Manifest ParseManifest(const std::string& text) {
  Field m{JsonReader(text).Document(), ""};
  std::optional<int64_t> version = m["format_version"].v.as<int64_t>();
  if (version != kFormatVersion)
    throw InputError("manifest.json has format version " + (version ? std::to_string(*version) : "?") +
                     ", this runner reads version " + std::to_string(kFormatVersion) + " (rebuild the bundle)");
  Manifest out;
  Field model = m["model"];
  model["name"].Str(), model["file"].Str(), model["sha256"].Hex64();
  out.entry = m["entry"].Str();
  if (!m["load"].IsNull()) out.load = m["load"].Str();
  out.inputs = ReadSpecs(m["inputs"], false);
  out.outputs = ReadSpecs(m["outputs"], true);
  if (out.outputs.empty()) m["outputs"].Fail("is empty");
  out.library = m["library"].RelPath();
  if (out.library.size() < 4 || out.library.compare(out.library.size() - 3, 3, ".so") != 0)
    m["library"].Fail("is not a .so file");
  if (!m["params"].IsNull()) out.params = m["params"].RelPath();

  Field target = m["target"];
  for (const char* key : {"name", "description", "arch"}) target[key].Str();
  Field device = target["device"];
  std::string kind = device["kind"].Str();
  auto dev = kDevices.find(kind);
  if (dev == kDevices.end()) device["kind"].Fail("is not one of cpu, cuda, opencl, vulkan, metal, rocm");
  out.device_kind = kind;
  out.device = DLDevice{dev->second, 0};
  // TVM starts as many workers as TVM_NUM_THREADS says: a manifest gets no more than this machine's cores
  out.threads = static_cast<int>(std::min<int64_t>(device["threads"].Count(), std::thread::hardware_concurrency()));
  device["memory_mb"].Count();
  for (const Field& lib : device["runtime_libs"].Items()) lib.Str();
  target["tvm"]["target"].Obj();
  for (const char* key : {"triple", "apt_package"}) target["toolchain"][key].Str();
  target["toolchain"]["compiler"].Command();
  if (auto emulator = target.Opt("emulator")) {
    (*emulator)["command"].Command(), (*emulator)["sysroot"].AbsPath(), (*emulator)["apt_package"].Str();
  }

  for (const char* key : {"edgec", "tvm", "tvm_ffi"}) m["versions"][key].Str();
  for (const Field& p : m["passes"].Items()) p.Str();
  Field sample = m["sample"];
  if (!sample.IsNull()) sample["inputs"].RelPath(), sample["expected"].RelPath();
  Field verification = m["verification"];
  std::string status = verification["status"].Str();
  if (status != "verified" && status != "not verified") verification["status"].Fail("is not one of verified, not verified");
  for (const char* key : {"reason", "reference", "runner"})
    if (!verification[key].IsNull()) verification[key].Str();
  verification["tolerance"]["atol"].Number(), verification["tolerance"]["rtol"].Number();
  for (const auto& kv : verification["outputs"].Obj()) {
    Field error{kv.second, verification["outputs"].Child(std::string(*kv.first.as<ffi::String>()))};
    error["max_abs"].Number(), error["max_rel"].Number();
  }

  for (const auto& kv : m["files"].Obj()) {
    std::string rel(*kv.first.as<ffi::String>());  // JSON object keys are always strings
    if (!IsCleanRelativePath(rel) || rel == "manifest.json")
      throw InputError("manifest.json: 'files' lists '" + rel + "', not a relative, normalised path of a bundle file");
    Field entry{kv.second, m["files"].Child(rel)};
    out.files[rel] = FileEntry{entry["sha256"].Hex64(), static_cast<uint64_t>(entry["size"].Count())};
  }
  if (auto libs = m.Opt("shared_libs"))
    for (const Field& lib : libs->Items()) out.shared_libs.push_back(lib.RelPath());
  if (auto features = m.Opt("cpu_features"))
    for (const Field& f : features->Items()) out.cpu_features.push_back(f.Str());
  if (auto states = m.Opt("states")) {
    out.initial_states = (*states)["initial"].RelPath();
    std::set<size_t> ins, outs;
    for (const Field& pair : (*states)["pairs"].Items()) {
      pair["name"].Str();
      auto find = [&](const std::vector<TensorSpec>& specs, const Field& name) {
        std::string n = name.Str();
        for (size_t i = 0; i < specs.size(); ++i)
          if (specs[i].name == n) return i;
        name.Fail("is not a tensor of the model");
      };
      StatePair sp{find(out.inputs, pair["input"]), find(out.outputs, pair["output"])};
      if (out.inputs[sp.input].shape != out.outputs[sp.output].shape ||
          out.inputs[sp.input].dtype != out.outputs[sp.output].dtype)
        pair.Fail("pairs tensors of different shapes or dtypes");
      if (!ins.insert(sp.input).second || !outs.insert(sp.output).second) (*states)["pairs"].Fail("has a tensor twice");
      out.states.push_back(sp);
    }
  }
  std::vector<std::string> needed = {out.library};
  needed.insert(needed.end(), out.shared_libs.begin(), out.shared_libs.end());
  if (!out.params.empty()) needed.push_back(out.params);
  if (!out.initial_states.empty()) needed.push_back(out.initial_states);
  if (!sample.IsNull()) {
    for (const TensorSpec& s : out.inputs) out.sample_inputs.push_back(sample["inputs"].Str() + "/" + s.file);
    needed.insert(needed.end(), out.sample_inputs.begin(), out.sample_inputs.end());
    for (const TensorSpec& s : out.outputs) needed.push_back(sample["expected"].Str() + "/" + s.file);
  }
  for (const std::string& rel : needed)
    if (!out.files.count(rel)) throw InputError("manifest.json: '" + rel + "' is not listed in 'files'");
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// The bundle

struct Bundle {
  Manifest manifest;
  std::string library, params, initial_states;  // the verified bytes that get loaded
  std::vector<std::string> shared_libs;  // likewise, in the manifest's order
};

// Spec rules 1-5, in that order, before any byte of the bundle reaches TVM.
Bundle LoadBundle(const fs::path& dir, bool verify) {
  std::string manifest_path = (dir / "manifest.json").string();
  uint64_t size;
  Fd manifest = OpenRegular(manifest_path, "bundle manifest", &size);
  if (size > kMaxManifestBytes) throw InputError(manifest_path + " is too large to be a manifest");
  Bundle b{ParseManifest(ReadRest(manifest, size, manifest_path)), "", "", "", {}};
  b.shared_libs.resize(b.manifest.shared_libs.size());
  const auto& files = b.manifest.files;

  // The files on disk, without following any symlink, must be exactly the listed ones.
  std::set<std::string> found;
  for (auto it = fs::recursive_directory_iterator(dir); it != fs::recursive_directory_iterator(); ++it) {
    std::string rel = it->path().lexically_relative(dir).generic_string();
    fs::file_status st = it->symlink_status();
    if (fs::is_symlink(st)) throw InputError("bundle path " + rel + " is a symlink (bundles hold regular files only)");
    if (fs::is_directory(st) || rel == "manifest.json") continue;
    if (!fs::is_regular_file(st)) throw InputError("bundle path " + rel + " is not a regular file");
    auto entry = files.find(rel);
    if (entry == files.end()) throw InputError("bundle file " + rel + " is not listed in manifest.json");
    if (it->file_size() != entry->second.size)
      throw InputError("bundle file " + rel + " has " + std::to_string(it->file_size()) +
                       " bytes, its size in the manifest is " + std::to_string(entry->second.size));
    found.insert(rel);
  }
  for (const auto& kv : files)
    if (!found.count(kv.first)) throw InputError("bundle file " + kv.first + " is listed in manifest.json but missing");

  // Hash the bytes that will be loaded, and stream every other file through the hash.
  for (const auto& [rel, entry] : files) {
    std::string path = (dir / rel).string();
    std::string* keep = rel == b.manifest.library  ? &b.library
                        : rel == b.manifest.params ? &b.params
                        : rel == b.manifest.initial_states ? &b.initial_states
                                                           : nullptr;
    for (size_t i = 0; i < b.shared_libs.size(); ++i)
      if (rel == b.manifest.shared_libs[i]) keep = &b.shared_libs[i];
    if (keep == nullptr && !verify) continue;
    Sha256 h;
    uint64_t actual, total = 0;
    Fd f = OpenRegular(path, "bundle file", &actual);
    if (actual != entry.size) throw InputError("bundle file " + rel + " changed size while it was checked");
    if (keep != nullptr) {
      *keep = ReadRest(f, entry.size, path);
      h.Update(reinterpret_cast<const unsigned char*>(keep->data()), keep->size());
    } else {
      std::vector<unsigned char> buf(1 << 20);
      for (ssize_t got; (got = read(f.fd, buf.data(), buf.size())) != 0;) {
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) throw InputError("cannot read bundle file " + rel + " (" + std::strerror(errno) + ")");
        h.Update(buf.data(), static_cast<size_t>(got));
        total += static_cast<uint64_t>(got);
      }
      if (total != entry.size) throw InputError("bundle file " + rel + " changed size while it was read");
    }
    if (verify && h.HexDigest() != entry.sha256)
      throw InputError("bundle file " + rel + " does not match its sha256 in the manifest (modified or corrupted)");
  }
  return b;
}

// ---------------------------------------------------------------------------------------------------------
// TVM

ffi::Function Global(const char* name) {
  auto f = ffi::Function::GetGlobal(name);
  if (!f.has_value()) throw std::runtime_error(std::string("the TVM runtime has no function ") + name);
  return *f;
}

ffi::Function GetFunction(const ffi::Module& mod, const std::string& name) {
  auto f = mod->GetFunction(name);
  if (!f.has_value()) throw InputError("the model library has no function '" + name + "' (not a Relax VM executable?)");
  return *f;
}

// Hands the verified library bytes to the dynamic loader without a file anyone else could swap: an anonymous
// memory file, opened by the loader as /proc/self/fd/N. TVM picks its loader by file suffix, which that path
// lacks, so the .so loader is called directly.
std::string ToMemfd(const Fd& mem, const std::string& bytes) {
  if (mem.fd < 0) throw std::runtime_error(std::string("memfd_create failed: ") + std::strerror(errno));
  for (size_t done = 0; done < bytes.size();) {
    ssize_t n = write(mem.fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) throw std::runtime_error(std::string("cannot write a library to memory: ") + std::strerror(errno));
    done += static_cast<size_t>(n);
  }
  return "/proc/self/fd/" + std::to_string(mem.fd);
}

// The libraries the model library needs, shipped in the bundle, loaded the same way and kept loaded: the model
// library's (and each other's) dependencies are then found already loaded, by soname. Their memfds stay open:
// the loader knows each library by its /proc/self/fd/N path, which must never name another file later.
void LoadSharedLibs(const std::vector<std::string>& rels, const std::vector<std::string>& bytes) {
  static std::vector<Fd> loaded;
  for (size_t i = 0; i < rels.size(); ++i) {
    loaded.emplace_back(memfd_create("edgec-lib.so", MFD_CLOEXEC));
    if (dlopen(ToMemfd(loaded.back(), bytes[i]).c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr)
      throw InputError("cannot load bundle file " + rels[i] + ": " + dlerror());
  }
}

ffi::Module LoadLibrary(const std::string& bytes) {
  Fd mem(memfd_create("edgec-model.so", MFD_CLOEXEC));
  std::string path = ToMemfd(mem, bytes);
  return Global("ffi.Module.load_from_file.so")(ffi::String(path), ffi::String("so")).cast<ffi::Module>();
}

// Runs a step that loads part of the bundle into TVM: a library, executable or params file that TVM cannot
// load is a bad bundle (exit 2), not a failure of the runtime.
template <typename F>
auto Loading(const std::string& what, F&& step) -> decltype(step()) {
  try {
    return step();
  } catch (const ffi::Error& e) {
    throw InputError("cannot load " + what + ": " + e.kind() + ": " + e.message());
  }
}

ffi::Tensor NewCopy(const ffi::Tensor& t, DLDevice dev) {
  static ffi::Function alloc = Global("runtime.TVMTensorAllocWithScope"), copy = Global("runtime.TVMTensorCopyFromTo");
  ffi::Tensor out = alloc(ffi::Shape(t.shape()), t.dtype(), dev, nullptr).cast<ffi::Tensor>();
  copy(t, out);
  return out;
}

ffi::Tensor CopyTo(const ffi::Tensor& t, DLDevice dev) {
  if (t.device().device_type == dev.device_type && t.device().device_id == dev.device_id) return t;
  return NewCopy(t, dev);
}

// The VM returns a Tensor or a (nested) tuple of Tensors; outputs are its leaves in order.
void Flatten(const ffi::Any& value, std::vector<ffi::Tensor>* out) {
  if (auto t = value.try_cast<ffi::Tensor>()) {
    out->push_back(*t);
  } else if (auto a = value.try_cast<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& v : *a) Flatten(v, out);
  } else {
    throw std::runtime_error("the model returned a " + value.GetTypeKey() + ", expected tensors");
  }
}

// ---------------------------------------------------------------------------------------------------------

double MsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

int ParseCount(const char* arg, const char* what, long min, long max) {
  char* end;
  errno = 0;
  long v = std::strtol(arg, &end, 10);
  if (*arg == '\0' || *end != '\0' || errno != 0 || v < min || v > max)
    throw InputError(std::string(what) + " must be a whole number from " + std::to_string(min) + " to " +
                     std::to_string(max));
  return static_cast<int>(v);
}

// Peak resident memory of this process in KiB. VmHWM starts afresh at exec, unlike getrusage's ru_maxrss,
// which keeps the high-water mark of the (possibly large) process that forked us.
long PeakRssKb() {
  if (std::FILE* f = std::fopen("/proc/self/status", "r")) {
    char line[256];
    long kb = -1;
    while (kb < 0 && std::fgets(line, sizeof(line), f))
      if (std::strncmp(line, "VmHWM:", 6) == 0) kb = std::strtol(line + 6, nullptr, 10);
    std::fclose(f);
    if (kb >= 0) return kb;
  }
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);  // no procfs: ru_maxrss, in KiB on Linux
  return usage.ru_maxrss;
}

const char kUsage[] = "usage: edgec_run [--stream] [-d BUNDLE_DIR] [-o OUT_DIR] [-n REPEAT] [-w WARMUP] [-t THREADS] "
                      "[-v] [--no-verify] [IN0.npy ...]";

int Run(int argc, char** argv) {
  std::string bundle_dir = ".", out_dir = ".";
  int repeat = 1, warmup = 0, threads = 0;
  bool verify = true, verbose = false, stream = false;
  const option long_options[] = {{"no-verify", no_argument, nullptr, 'V'}, {"stream", no_argument, nullptr, 'S'},
                                 {nullptr, 0, nullptr, 0}};
  for (int c; (c = getopt_long(argc, argv, "d:o:n:w:t:vh", long_options, nullptr)) != -1;) {
    if (c == 'd') bundle_dir = optarg;
    else if (c == 'o') out_dir = optarg;
    else if (c == 'n') repeat = ParseCount(optarg, "-n REPEAT", 0, 1000000);
    else if (c == 'w') warmup = ParseCount(optarg, "-w WARMUP", 0, 1000000);
    else if (c == 't') threads = ParseCount(optarg, "-t THREADS", 1, 1024);
    else if (c == 'V') verify = false;
    else if (c == 'S') stream = true;
    else if (c == 'v') verbose = true;
    else throw InputError(kUsage);
  }
  // TVM logs warnings straight to stderr (e.g. several lines before a failed allocation); errors must stay one
  // line, so the runtime's stderr goes to /dev/null and this program's messages to a duplicate of stderr.
  int null_fd = verbose ? -1 : open("/dev/null", O_WRONLY | O_CLOEXEC);
  if (null_fd >= 0) {
    g_stderr = fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 0);
    dup2(null_fd, STDERR_FILENO);
    close(null_fd);
  }
  if (!verify)
    Message("warning", "--no-verify: not checking the sha256 of bundle files "
                       "(manifest, paths, file list and sizes are still checked)");

  Bundle bundle = LoadBundle(bundle_dir, verify);
  const Manifest& m = bundle.manifest;
  std::vector<std::string> in_paths(argv + optind, argv + argc);
  if (in_paths.empty() && !stream)
    for (const std::string& rel : m.sample_inputs) in_paths.push_back((fs::path(bundle_dir) / rel).string());
  // the inputs each file gives: all of them, or in a stream those that are not state inputs
  std::vector<size_t> given;
  for (size_t i = 0; i < m.inputs.size(); ++i)
    if (!stream || std::none_of(m.states.begin(), m.states.end(), [&](const StatePair& p) { return p.input == i; }))
      given.push_back(i);
  if (stream && m.states.empty()) throw InputError("--stream: the model keeps no state between calls");
  if (stream && given.empty()) throw InputError("--stream: every input of the model is a state input");
  if (stream ? in_paths.empty() || in_paths.size() % given.size() != 0 : in_paths.size() != given.size()) {
    std::string names;
    for (size_t i : given) names += (names.empty() ? "" : ", ") + m.inputs[i].name;
    throw InputError("expected " + std::string(stream ? "a multiple of " : "") + std::to_string(given.size()) +
                     " input .npy files (" + names + (stream ? " per step" : "") + "), got " +
                     std::to_string(in_paths.size()));
  }
  // every file is read and checked before anything is loaded; steps[k][i] is input i of step k (state inputs
  // are filled in from the initial values and the previous step's outputs)
  std::vector<std::vector<ffi::Tensor>> steps(stream ? in_paths.size() / given.size() : 1,
                                              std::vector<ffi::Tensor>(m.inputs.size()));
  for (size_t k = 0, f = 0; k < steps.size(); ++k)
    for (size_t i : given) steps[k][i] = ReadNpy(in_paths[f++], m.inputs[i]);

  auto t0 = std::chrono::steady_clock::now();
  // TVM sizes its thread pool from TVM_NUM_THREADS when it first starts it; without it, it takes half the cores
  // on x86 (and runtime.config_threadpool cannot go above that).
  if (int n = threads ? threads : m.threads) setenv("TVM_NUM_THREADS", std::to_string(n).c_str(), 1);
  // With shipped offload libraries, the model's load function moves TVM's parallel loops onto the library's pool:
  // TVM's idle pool sleeps and pins no thread (this one, whose pin libgomp's team would inherit), and libgomp's
  // workers spin 10000 rounds (about 100 us), not 3 ms, before they sleep (unless the environment says otherwise;
  // run.py says why and what was measured).
  if (!m.shared_libs.empty()) {
    setenv("TVM_THREAD_POOL_SPIN_COUNT", "0", 0);
    setenv("TVM_BIND_THREADS", "0", 0);
    if (!getenv("OMP_WAIT_POLICY")) setenv("GOMP_SPINCOUNT", "10000", 0);
  }
  // attribute 0 (kExist) is 0 for a missing device, and for one this TVM runtime was built without
  if (!Global("runtime.GetDeviceAttr")(static_cast<int>(m.device.device_type), 0, 0).cast<bool>())
    throw InputError("this machine has no " + m.device_kind + " device that the TVM runtime can use, and the bundle "
                     "was built for one");
  std::string lacking = CpuFeaturesLacking(m.cpu_features);
  if (!lacking.empty())
    throw InputError("the bundle's code uses " + lacking + ", which this machine's CPU lacks (it would stop with an "
                     "illegal instruction): run it on its board, or build it for this machine (edgec build -t host)");
  LoadSharedLibs(m.shared_libs, bundle.shared_libs);
  ffi::Module vm = Loading("the model library " + m.library, [&] {
    ffi::Module vm = GetFunction(LoadLibrary(bundle.library), "vm_load_executable")().cast<ffi::Module>();
    // (device type, device id, allocator: 2 = pooled, so the memory of one run is reused by the next) for the
    // model's device, plus the host CPU, on which the VM runs shape computations, as relax.VirtualMachine does
    if (m.device.device_type == kDLCPU)
      GetFunction(vm, "vm_initialization")(static_cast<int>(kDLCPU), 0, 2);
    else
      GetFunction(vm, "vm_initialization")(static_cast<int>(m.device.device_type), 0, 2, static_cast<int>(kDLCPU), 0, 2);
    return vm;
  });
  ffi::Function entry = GetFunction(vm, m.entry);
  int arity = Loading("the signature of '" + m.entry + "' in " + m.library,
                      [&] { return GetFunction(vm, "get_function_arity")(m.entry).cast<int>(); });
  if (stream) {
    auto initial = Loading("the initial states " + m.initial_states, [&] {
      return Global("runtime.LoadParams")(ffi::Bytes(std::move(bundle.initial_states))).cast<ffi::Map<ffi::String, ffi::Tensor>>();
    });
    for (const StatePair& p : m.states) {
      const TensorSpec& spec = m.inputs[p.input];
      auto it = initial.find(ffi::String(spec.name));
      if (it == initial.end()) throw InputError(m.initial_states + " has no initial value for '" + spec.name + "'");
      ffi::Tensor t = (*it).second;
      if (std::vector<int64_t>(t.shape().begin(), t.shape().end()) != spec.shape || DTypeByDL(t.dtype()) != spec.dtype)
        throw InputError(m.initial_states + " holds '" + spec.name + "' with another shape or dtype than the input's");
      steps[0][p.input] = t;
    }
  }
  const size_t inputs_size = m.inputs.size();
  std::vector<ffi::Any> args;
  for (const ffi::Tensor& t : steps[0]) args.push_back(CopyTo(t, m.device));
  // The weights, in the order of the parameters of "load" (when the manifest names it; it returns what the entry
  // takes after the inputs: with offload, each library call site's packed weights and operator) or else of the
  // entry's parameters after the inputs.
  std::vector<ffi::Any> weights;
  const std::string& takes = m.load.empty() ? m.entry : m.load;
  int first = m.load.empty() ? static_cast<int>(inputs_size) : 0;
  int count = m.load.empty() ? arity : Loading("the signature of '" + m.load + "' in " + m.library, [&] {
    return GetFunction(vm, "get_function_arity")(m.load).cast<int>();
  });
  if (!m.params.empty()) {
    auto params = Loading("the weights " + m.params, [&] {
      return Global("runtime.LoadParams")(ffi::Bytes(std::move(bundle.params))).cast<ffi::Map<ffi::String, ffi::Tensor>>();
    });
    ffi::Function param_name = GetFunction(vm, "get_function_param_name");
    for (int i = first; i < count; ++i) {
      ffi::String name = param_name(takes, i).cast<ffi::String>();
      auto it = params.find(name);
      if (it == params.end()) throw InputError(m.params + " has no weight '" + std::string(name) + "'");
      weights.push_back(CopyTo((*it).second, m.device));
    }
  }
  if (m.load.empty()) {
    args.insert(args.end(), weights.begin(), weights.end());
  } else {
    if (static_cast<int>(weights.size()) != count)
      throw InputError("'" + m.load + "' takes " + std::to_string(count) + " weights, the bundle gives " +
                       std::to_string(weights.size()) + " (library and manifest do not match)");
    std::vector<ffi::AnyView> views(weights.begin(), weights.end());
    ffi::Any made;
    GetFunction(vm, m.load).CallPacked(views.data(), static_cast<int>(views.size()), &made);
    for (const ffi::Any& value : made.cast<ffi::Array<ffi::Any>>()) args.push_back(value);
  }
  if (static_cast<int>(args.size()) != arity)
    throw InputError("'" + m.entry + "' takes " + std::to_string(arity) + " arguments, the bundle gives " +
                     std::to_string(args.size()) + " (library and manifest do not match)");
  double load_ms = MsSince(t0);

  ffi::Any ret;
  // made once, outside the timed calls; a streamed step that replaces args[i] re-points views[i]
  std::vector<ffi::AnyView> views(args.begin(), args.end());
  auto call = [&] { entry.CallPacked(views.data(), static_cast<int>(views.size()), &ret); };
  // The outputs of the last call, checked against the manifest and written to `dir`.
  auto write_outputs = [&](const fs::path& dir) {
    std::vector<ffi::Tensor> outputs;
    Flatten(ret, &outputs);
    if (outputs.size() != m.outputs.size())
      throw InputError("the model returned " + std::to_string(outputs.size()) + " tensors, the manifest lists " +
                       std::to_string(m.outputs.size()) + " outputs (library and manifest do not match)");
    fs::create_directories(dir);
    for (size_t i = 0; i < outputs.size(); ++i) {
      const TensorSpec& spec = m.outputs[i];
      ffi::Tensor t = CopyTo(outputs[i], DLDevice{kDLCPU, 0});
      std::vector<int64_t> shape(t.shape().begin(), t.shape().end());
      const DType* dtype = DTypeByDL(t.dtype());
      if (!Fits(shape, spec.shape) || dtype != spec.dtype || !t.IsContiguous())
        throw InputError("output '" + spec.name + "' is " + (dtype ? dtype->name : "an unsupported dtype") +
                         ShapeStr(shape) + ", the manifest says " + spec.dtype->name + ShapeStr(spec.shape) +
                         " (library and manifest do not match)");
      WriteNpy((dir / spec.file).string(), t, spec.dtype);
    }
    return outputs;
  };
  double first_ms = 0;
  std::vector<double> times;
  if (stream) {
    // one call per step; the state outputs of step k become the state inputs of step k + 1
    repeat = static_cast<int>(steps.size()), warmup = 0;
    for (size_t k = 0; k < steps.size(); ++k) {
      if (k > 0)
        for (size_t i = 0; i < inputs_size; ++i) {
          args[i] = CopyTo(steps[k][i], m.device);
          views[i] = args[i];
        }
      t0 = std::chrono::steady_clock::now();
      call();
      times.push_back(MsSince(t0));
      std::vector<ffi::Tensor> outputs = write_outputs(fs::path(out_dir) / std::to_string(k));
      if (k + 1 < steps.size())
        // a copy: the VM may reuse an output's memory in the next call, which reads the state
        for (const StatePair& p : m.states) steps[k + 1][p.input] = NewCopy(outputs[p.output], m.device);
    }
    first_ms = times[0];
  } else {
    t0 = std::chrono::steady_clock::now();
    call();
    first_ms = MsSince(t0);
    for (int i = 0; i < warmup; ++i) call();
    for (int i = 0; i < repeat; ++i) {
      t0 = std::chrono::steady_clock::now();
      call();
      times.push_back(MsSince(t0));
    }
    write_outputs(out_dir);
  }
  if (times.empty()) times.push_back(first_ms);
  std::sort(times.begin(), times.end());
  size_t mid = times.size() / 2;
  double median_ms = times.size() % 2 ? times[mid] : (times[mid - 1] + times[mid]) / 2;

  std::printf("edgec_run: load_ms=%.6g first_ms=%.6g median_ms=%.6g min_ms=%.6g peak_rss_kb=%ld repeat=%d warmup=%d "
              "threads=%d\n", load_ms, first_ms, median_ms, times[0], PeakRssKb(), repeat, warmup,
              Global("runtime.NumThreads")().cast<int>());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const InputError& e) {
    Message("error", e.what());
    return 2;
  } catch (const fs::filesystem_error& e) {
    Message("error", e.what());
    return 2;
  } catch (const ffi::Error& e) {
    Message("TVM error", e.kind() + ": " + e.message());
    return 1;
  } catch (const std::exception& e) {
    Message("error", e.what());
    return 1;
  } catch (...) {
    Message("error", "unknown failure");
    return 1;
  }
}
