/*
 * pkcs11_min.h - the minimal subset of the PKCS#11 v2.40 types needed by the
 * fault-injection module (xks_fault_pkcs11.c).
 *
 * Written from the OASIS PKCS#11 v2.40 base specification (section 3, "Data
 * types", and section 5, "Functions"); it is not a copy of the official
 * pkcs11.h / pkcs11t.h / pkcs11f.h headers, which are not installed on the
 * build hosts.  Only the Unix ABI is covered: CK_ULONG is "unsigned long",
 * structures use the default packing, and function pointers need no special
 * calling convention.
 *
 * Structures whose members the shim never looks at (CK_INFO, CK_SLOT_INFO,
 * CK_MECHANISM_INFO, CK_ATTRIBUTE) are declared as incomplete types: the shim
 * only ever passes pointers to them through to the real module.  The vendor
 * profiles (AES-GCM emulation) need the members of CK_MECHANISM, CK_GCM_PARAMS
 * and CK_SESSION_INFO, and the token clock those of CK_TOKEN_INFO, defined below.
 */
#ifndef XKS_PKCS11_MIN_H
#define XKS_PKCS11_MIN_H

typedef unsigned char CK_BYTE;
typedef CK_BYTE CK_CHAR;
typedef CK_BYTE CK_UTF8CHAR;
typedef CK_BYTE CK_BBOOL;
typedef unsigned long CK_ULONG;
typedef long CK_LONG;
typedef CK_ULONG CK_FLAGS;

typedef CK_BYTE *CK_BYTE_PTR;
typedef CK_UTF8CHAR *CK_UTF8CHAR_PTR;
typedef CK_ULONG *CK_ULONG_PTR;
typedef void *CK_VOID_PTR;

typedef CK_ULONG CK_RV;
typedef CK_ULONG CK_SLOT_ID;
typedef CK_SLOT_ID *CK_SLOT_ID_PTR;
typedef CK_ULONG CK_SESSION_HANDLE;
typedef CK_SESSION_HANDLE *CK_SESSION_HANDLE_PTR;
typedef CK_ULONG CK_OBJECT_HANDLE;
typedef CK_OBJECT_HANDLE *CK_OBJECT_HANDLE_PTR;
typedef CK_ULONG CK_USER_TYPE;
typedef CK_ULONG CK_MECHANISM_TYPE;
typedef CK_MECHANISM_TYPE *CK_MECHANISM_TYPE_PTR;
typedef CK_ULONG CK_NOTIFICATION;

typedef struct CK_VERSION {
    CK_BYTE major;
    CK_BYTE minor;
} CK_VERSION;

/* Opaque to the shim: passed through by pointer only. */
typedef struct CK_INFO CK_INFO;
typedef struct CK_SLOT_INFO CK_SLOT_INFO;
typedef struct CK_MECHANISM_INFO CK_MECHANISM_INFO;
typedef struct CK_ATTRIBUTE CK_ATTRIBUTE;
typedef CK_INFO *CK_INFO_PTR;
typedef CK_SLOT_INFO *CK_SLOT_INFO_PTR;
typedef struct CK_TOKEN_INFO *CK_TOKEN_INFO_PTR;
typedef CK_MECHANISM_INFO *CK_MECHANISM_INFO_PTR;
typedef CK_ATTRIBUTE *CK_ATTRIBUTE_PTR;

/* Written by the token clock (section 3.2: flags, and utcTime as YYYYMMDDhhmmss00). */
typedef struct CK_TOKEN_INFO {
    CK_UTF8CHAR label[32];
    CK_UTF8CHAR manufacturerID[32];
    CK_UTF8CHAR model[16];
    CK_CHAR serialNumber[16];
    CK_FLAGS flags;
    CK_ULONG ulMaxSessionCount;
    CK_ULONG ulSessionCount;
    CK_ULONG ulMaxRwSessionCount;
    CK_ULONG ulRwSessionCount;
    CK_ULONG ulMaxPinLen;
    CK_ULONG ulMinPinLen;
    CK_ULONG ulTotalPublicMemory;
    CK_ULONG ulFreePublicMemory;
    CK_ULONG ulTotalPrivateMemory;
    CK_ULONG ulFreePrivateMemory;
    CK_VERSION hardwareVersion;
    CK_VERSION firmwareVersion;
    CK_CHAR utcTime[16];
} CK_TOKEN_INFO;
#define CKF_CLOCK_ON_TOKEN 0x00000040UL

/* Read by the vendor profiles (AES-GCM emulation). */
typedef CK_ULONG CK_STATE;

typedef struct CK_SESSION_INFO {
    CK_SLOT_ID slotID;
    CK_STATE state;
    CK_FLAGS flags;
    CK_ULONG ulDeviceError;
} CK_SESSION_INFO;
typedef CK_SESSION_INFO *CK_SESSION_INFO_PTR;

typedef struct CK_MECHANISM {
    CK_MECHANISM_TYPE mechanism;
    CK_VOID_PTR pParameter;
    CK_ULONG ulParameterLen;
} CK_MECHANISM;
typedef CK_MECHANISM *CK_MECHANISM_PTR;

/*
 * The parameter of CKM_AES_GCM as in the v2.40 normative header (pkcs11t.h),
 * with ulIvBits: the v2.40 prose omits it, but every v2.40 module (SoftHSM
 * included) is built from the header, and SoftHSM requires
 * ulParameterLen == sizeof(CK_GCM_PARAMS) of this layout (48 bytes on LP64).
 */
typedef struct CK_GCM_PARAMS {
    CK_BYTE_PTR pIv;
    CK_ULONG ulIvLen;
    CK_ULONG ulIvBits;
    CK_BYTE_PTR pAAD;
    CK_ULONG ulAADLen;
    CK_ULONG ulTagBits;
} CK_GCM_PARAMS;

#define CKM_AES_GCM 0x00001087UL

typedef CK_RV (*CK_NOTIFY)(CK_SESSION_HANDLE hSession, CK_NOTIFICATION event,
                           CK_VOID_PTR pApplication);

typedef struct CK_FUNCTION_LIST CK_FUNCTION_LIST;
typedef CK_FUNCTION_LIST *CK_FUNCTION_LIST_PTR;
typedef CK_FUNCTION_LIST_PTR *CK_FUNCTION_LIST_PTR_PTR;

/*
 * The 68 PKCS#11 v2.x functions, in the order in which they appear in
 * CK_FUNCTION_LIST (the order of the v2.40 spec, section 5).  The order is
 * the ABI: a module's function list is indexed by position.
 *
 * X(name, parenthesised parameter list, parenthesised argument list) is applied
 * to every function except C_GetFunctionList, to which GFL (same arguments) is
 * applied instead: a wrapper module forwards the former and must implement the
 * latter itself.  Pass the same macro twice to visit all 68 in order.
 */
#define XKS_PKCS11_FUNCTIONS(X, GFL)                                                \
    /* 5.4 General-purpose functions */                                             \
    X(C_Initialize, (CK_VOID_PTR pInitArgs), (pInitArgs))                           \
    X(C_Finalize, (CK_VOID_PTR pReserved), (pReserved))                             \
    X(C_GetInfo, (CK_INFO_PTR pInfo), (pInfo))                                      \
    GFL(C_GetFunctionList, (CK_FUNCTION_LIST_PTR_PTR ppFunctionList),               \
        (ppFunctionList))                                                           \
    /* 5.5 Slot and token management functions */                                   \
    X(C_GetSlotList,                                                                \
      (CK_BBOOL tokenPresent, CK_SLOT_ID_PTR pSlotList, CK_ULONG_PTR pulCount),     \
      (tokenPresent, pSlotList, pulCount))                                          \
    X(C_GetSlotInfo, (CK_SLOT_ID slotID, CK_SLOT_INFO_PTR pInfo), (slotID, pInfo))  \
    X(C_GetTokenInfo, (CK_SLOT_ID slotID, CK_TOKEN_INFO_PTR pInfo),                 \
      (slotID, pInfo))                                                              \
    X(C_GetMechanismList,                                                           \
      (CK_SLOT_ID slotID, CK_MECHANISM_TYPE_PTR pMechanismList,                     \
       CK_ULONG_PTR pulCount),                                                      \
      (slotID, pMechanismList, pulCount))                                           \
    X(C_GetMechanismInfo,                                                           \
      (CK_SLOT_ID slotID, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO_PTR pInfo),     \
      (slotID, type, pInfo))                                                        \
    X(C_InitToken,                                                                  \
      (CK_SLOT_ID slotID, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen,                  \
       CK_UTF8CHAR_PTR pLabel),                                                     \
      (slotID, pPin, ulPinLen, pLabel))                                             \
    X(C_InitPIN,                                                                    \
      (CK_SESSION_HANDLE hSession, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen),        \
      (hSession, pPin, ulPinLen))                                                   \
    X(C_SetPIN,                                                                     \
      (CK_SESSION_HANDLE hSession, CK_UTF8CHAR_PTR pOldPin, CK_ULONG ulOldLen,      \
       CK_UTF8CHAR_PTR pNewPin, CK_ULONG ulNewLen),                                 \
      (hSession, pOldPin, ulOldLen, pNewPin, ulNewLen))                             \
    /* 5.6 Session management functions */                                          \
    X(C_OpenSession,                                                                \
      (CK_SLOT_ID slotID, CK_FLAGS flags, CK_VOID_PTR pApplication,                 \
       CK_NOTIFY Notify, CK_SESSION_HANDLE_PTR phSession),                          \
      (slotID, flags, pApplication, Notify, phSession))                             \
    X(C_CloseSession, (CK_SESSION_HANDLE hSession), (hSession))                     \
    X(C_CloseAllSessions, (CK_SLOT_ID slotID), (slotID))                            \
    X(C_GetSessionInfo, (CK_SESSION_HANDLE hSession, CK_SESSION_INFO_PTR pInfo),    \
      (hSession, pInfo))                                                            \
    X(C_GetOperationState,                                                          \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pOperationState,                     \
       CK_ULONG_PTR pulOperationStateLen),                                          \
      (hSession, pOperationState, pulOperationStateLen))                            \
    X(C_SetOperationState,                                                          \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pOperationState,                     \
       CK_ULONG ulOperationStateLen, CK_OBJECT_HANDLE hEncryptionKey,               \
       CK_OBJECT_HANDLE hAuthenticationKey),                                        \
      (hSession, pOperationState, ulOperationStateLen, hEncryptionKey,              \
       hAuthenticationKey))                                                         \
    X(C_Login,                                                                      \
      (CK_SESSION_HANDLE hSession, CK_USER_TYPE userType, CK_UTF8CHAR_PTR pPin,     \
       CK_ULONG ulPinLen),                                                          \
      (hSession, userType, pPin, ulPinLen))                                         \
    X(C_Logout, (CK_SESSION_HANDLE hSession), (hSession))                           \
    /* 5.7 Object management functions */                                           \
    X(C_CreateObject,                                                               \
      (CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount,    \
       CK_OBJECT_HANDLE_PTR phObject),                                              \
      (hSession, pTemplate, ulCount, phObject))                                     \
    X(C_CopyObject,                                                                 \
      (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject,                        \
       CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount,                                \
       CK_OBJECT_HANDLE_PTR phNewObject),                                           \
      (hSession, hObject, pTemplate, ulCount, phNewObject))                         \
    X(C_DestroyObject, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject),      \
      (hSession, hObject))                                                          \
    X(C_GetObjectSize,                                                              \
      (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, CK_ULONG_PTR pulSize), \
      (hSession, hObject, pulSize))                                                 \
    X(C_GetAttributeValue,                                                          \
      (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject,                        \
       CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount),                               \
      (hSession, hObject, pTemplate, ulCount))                                      \
    X(C_SetAttributeValue,                                                          \
      (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject,                        \
       CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount),                               \
      (hSession, hObject, pTemplate, ulCount))                                      \
    X(C_FindObjectsInit,                                                            \
      (CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount),   \
      (hSession, pTemplate, ulCount))                                               \
    X(C_FindObjects,                                                                \
      (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE_PTR phObject,                   \
       CK_ULONG ulMaxObjectCount, CK_ULONG_PTR pulObjectCount),                     \
      (hSession, phObject, ulMaxObjectCount, pulObjectCount))                       \
    X(C_FindObjectsFinal, (CK_SESSION_HANDLE hSession), (hSession))                 \
    /* 5.8 Encryption functions */                                                  \
    X(C_EncryptInit,                                                                \
      (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,                     \
       CK_OBJECT_HANDLE hKey),                                                      \
      (hSession, pMechanism, hKey))                                                 \
    X(C_Encrypt,                                                                    \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,           \
       CK_BYTE_PTR pEncryptedData, CK_ULONG_PTR pulEncryptedDataLen),               \
      (hSession, pData, ulDataLen, pEncryptedData, pulEncryptedDataLen))            \
    X(C_EncryptUpdate,                                                              \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen,           \
       CK_BYTE_PTR pEncryptedPart, CK_ULONG_PTR pulEncryptedPartLen),               \
      (hSession, pPart, ulPartLen, pEncryptedPart, pulEncryptedPartLen))            \
    X(C_EncryptFinal,                                                               \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pLastEncryptedPart,                  \
       CK_ULONG_PTR pulLastEncryptedPartLen),                                       \
      (hSession, pLastEncryptedPart, pulLastEncryptedPartLen))                      \
    /* 5.9 Decryption functions */                                                  \
    X(C_DecryptInit,                                                                \
      (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,                     \
       CK_OBJECT_HANDLE hKey),                                                      \
      (hSession, pMechanism, hKey))                                                 \
    X(C_Decrypt,                                                                    \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedData,                      \
       CK_ULONG ulEncryptedDataLen, CK_BYTE_PTR pData, CK_ULONG_PTR pulDataLen),    \
      (hSession, pEncryptedData, ulEncryptedDataLen, pData, pulDataLen))            \
    X(C_DecryptUpdate,                                                              \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart,                      \
       CK_ULONG ulEncryptedPartLen, CK_BYTE_PTR pPart, CK_ULONG_PTR pulPartLen),    \
      (hSession, pEncryptedPart, ulEncryptedPartLen, pPart, pulPartLen))            \
    X(C_DecryptFinal,                                                               \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pLastPart,                           \
       CK_ULONG_PTR pulLastPartLen),                                                \
      (hSession, pLastPart, pulLastPartLen))                                        \
    /* 5.10 Message digesting functions */                                          \
    X(C_DigestInit, (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism),      \
      (hSession, pMechanism))                                                       \
    X(C_Digest,                                                                     \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,           \
       CK_BYTE_PTR pDigest, CK_ULONG_PTR pulDigestLen),                             \
      (hSession, pData, ulDataLen, pDigest, pulDigestLen))                          \
    X(C_DigestUpdate,                                                               \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen),          \
      (hSession, pPart, ulPartLen))                                                 \
    X(C_DigestKey, (CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hKey),             \
      (hSession, hKey))                                                             \
    X(C_DigestFinal,                                                                \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pDigest, CK_ULONG_PTR pulDigestLen), \
      (hSession, pDigest, pulDigestLen))                                            \
    /* 5.11 Signing and MACing functions */                                         \
    X(C_SignInit,                                                                   \
      (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,                     \
       CK_OBJECT_HANDLE hKey),                                                      \
      (hSession, pMechanism, hKey))                                                 \
    X(C_Sign,                                                                       \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,           \
       CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen),                       \
      (hSession, pData, ulDataLen, pSignature, pulSignatureLen))                    \
    X(C_SignUpdate,                                                                 \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen),          \
      (hSession, pPart, ulPartLen))                                                 \
    X(C_SignFinal,                                                                  \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature,                          \
       CK_ULONG_PTR pulSignatureLen),                                               \
      (hSession, pSignature, pulSignatureLen))                                      \
    X(C_SignRecoverInit,                                                            \
      (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,                     \
       CK_OBJECT_HANDLE hKey),                                                      \
      (hSession, pMechanism, hKey))                                                 \
    X(C_SignRecover,                                                                \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,           \
       CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen),                       \
      (hSession, pData, ulDataLen, pSignature, pulSignatureLen))                    \
    /* 5.12 Functions for verifying signatures and MACs */                          \
    X(C_VerifyInit,                                                                 \
      (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,                     \
       CK_OBJECT_HANDLE hKey),                                                      \
      (hSession, pMechanism, hKey))                                                 \
    X(C_Verify,                                                                     \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen,           \
       CK_BYTE_PTR pSignature, CK_ULONG ulSignatureLen),                            \
      (hSession, pData, ulDataLen, pSignature, ulSignatureLen))                     \
    X(C_VerifyUpdate,                                                               \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen),          \
      (hSession, pPart, ulPartLen))                                                 \
    X(C_VerifyFinal,                                                                \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature,                          \
       CK_ULONG ulSignatureLen),                                                    \
      (hSession, pSignature, ulSignatureLen))                                       \
    X(C_VerifyRecoverInit,                                                          \
      (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,                     \
       CK_OBJECT_HANDLE hKey),                                                      \
      (hSession, pMechanism, hKey))                                                 \
    X(C_VerifyRecover,                                                              \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature,                          \
       CK_ULONG ulSignatureLen, CK_BYTE_PTR pData, CK_ULONG_PTR pulDataLen),        \
      (hSession, pSignature, ulSignatureLen, pData, pulDataLen))                    \
    /* 5.13 Dual-function cryptographic functions */                                \
    X(C_DigestEncryptUpdate,                                                        \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen,           \
       CK_BYTE_PTR pEncryptedPart, CK_ULONG_PTR pulEncryptedPartLen),               \
      (hSession, pPart, ulPartLen, pEncryptedPart, pulEncryptedPartLen))            \
    X(C_DecryptDigestUpdate,                                                        \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart,                      \
       CK_ULONG ulEncryptedPartLen, CK_BYTE_PTR pPart, CK_ULONG_PTR pulPartLen),    \
      (hSession, pEncryptedPart, ulEncryptedPartLen, pPart, pulPartLen))            \
    X(C_SignEncryptUpdate,                                                          \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen,           \
       CK_BYTE_PTR pEncryptedPart, CK_ULONG_PTR pulEncryptedPartLen),               \
      (hSession, pPart, ulPartLen, pEncryptedPart, pulEncryptedPartLen))            \
    X(C_DecryptVerifyUpdate,                                                        \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pEncryptedPart,                      \
       CK_ULONG ulEncryptedPartLen, CK_BYTE_PTR pPart, CK_ULONG_PTR pulPartLen),    \
      (hSession, pEncryptedPart, ulEncryptedPartLen, pPart, pulPartLen))            \
    /* 5.14 Key management functions */                                             \
    X(C_GenerateKey,                                                                \
      (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,                     \
       CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount, CK_OBJECT_HANDLE_PTR phKey),   \
      (hSession, pMechanism, pTemplate, ulCount, phKey))                            \
    X(C_GenerateKeyPair,                                                            \
      (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,                     \
       CK_ATTRIBUTE_PTR pPublicKeyTemplate, CK_ULONG ulPublicKeyAttributeCount,     \
       CK_ATTRIBUTE_PTR pPrivateKeyTemplate, CK_ULONG ulPrivateKeyAttributeCount,   \
       CK_OBJECT_HANDLE_PTR phPublicKey, CK_OBJECT_HANDLE_PTR phPrivateKey),        \
      (hSession, pMechanism, pPublicKeyTemplate, ulPublicKeyAttributeCount,         \
       pPrivateKeyTemplate, ulPrivateKeyAttributeCount, phPublicKey, phPrivateKey)) \
    X(C_WrapKey,                                                                    \
      (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,                     \
       CK_OBJECT_HANDLE hWrappingKey, CK_OBJECT_HANDLE hKey,                        \
       CK_BYTE_PTR pWrappedKey, CK_ULONG_PTR pulWrappedKeyLen),                     \
      (hSession, pMechanism, hWrappingKey, hKey, pWrappedKey, pulWrappedKeyLen))    \
    X(C_UnwrapKey,                                                                  \
      (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,                     \
       CK_OBJECT_HANDLE hUnwrappingKey, CK_BYTE_PTR pWrappedKey,                    \
       CK_ULONG ulWrappedKeyLen, CK_ATTRIBUTE_PTR pTemplate,                        \
       CK_ULONG ulAttributeCount, CK_OBJECT_HANDLE_PTR phKey),                      \
      (hSession, pMechanism, hUnwrappingKey, pWrappedKey, ulWrappedKeyLen,          \
       pTemplate, ulAttributeCount, phKey))                                         \
    X(C_DeriveKey,                                                                  \
      (CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,                     \
       CK_OBJECT_HANDLE hBaseKey, CK_ATTRIBUTE_PTR pTemplate,                       \
       CK_ULONG ulAttributeCount, CK_OBJECT_HANDLE_PTR phKey),                      \
      (hSession, pMechanism, hBaseKey, pTemplate, ulAttributeCount, phKey))         \
    /* 5.15 Random number generation functions */                                   \
    X(C_SeedRandom,                                                                 \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSeed, CK_ULONG ulSeedLen),          \
      (hSession, pSeed, ulSeedLen))                                                 \
    X(C_GenerateRandom,                                                             \
      (CK_SESSION_HANDLE hSession, CK_BYTE_PTR RandomData, CK_ULONG ulRandomLen),   \
      (hSession, RandomData, ulRandomLen))                                          \
    /* 5.16 Parallel function management functions (legacy) */                      \
    X(C_GetFunctionStatus, (CK_SESSION_HANDLE hSession), (hSession))                \
    X(C_CancelFunction, (CK_SESSION_HANDLE hSession), (hSession))                   \
    /* 5.5 (again): slot events, last in the list */                                \
    X(C_WaitForSlotEvent,                                                           \
      (CK_FLAGS flags, CK_SLOT_ID_PTR pSlot, CK_VOID_PTR pReserved),                \
      (flags, pSlot, pReserved))

#define XKS_PKCS11_FUNCTION_COUNT 68

/* CK_FUNCTION_LIST: a CK_VERSION followed by one pointer per function. */
#define XKS_PKCS11_LIST_MEMBER(name, params, args) CK_RV (*name) params;
struct CK_FUNCTION_LIST {
    CK_VERSION version;
    XKS_PKCS11_FUNCTIONS(XKS_PKCS11_LIST_MEMBER, XKS_PKCS11_LIST_MEMBER)
};
#undef XKS_PKCS11_LIST_MEMBER

/* CK_C_INITIALIZE_ARGS (only its flags are named here; the shim forwards it). */
#define CKF_LIBRARY_CANT_CREATE_OS_THREADS 0x00000001UL
#define CKF_OS_LOCKING_OK 0x00000002UL

/* The return values used by the shim itself; the full name table is in
 * xks_fault_pkcs11.c. */
#define CKR_OK 0x00000000UL
#define CKR_HOST_MEMORY 0x00000002UL
#define CKR_GENERAL_ERROR 0x00000005UL
#define CKR_FUNCTION_FAILED 0x00000006UL
#define CKR_ARGUMENTS_BAD 0x00000007UL
#define CKR_DATA_LEN_RANGE 0x00000021UL
#define CKR_ENCRYPTED_DATA_INVALID 0x00000040UL
#define CKR_FUNCTION_NOT_SUPPORTED 0x00000054UL
#define CKR_MECHANISM_PARAM_INVALID 0x00000071UL
#define CKR_OPERATION_ACTIVE 0x00000090UL
#define CKR_SESSION_CLOSED 0x000000B0UL
#define CKR_SESSION_HANDLE_INVALID 0x000000B3UL
#define CKR_BUFFER_TOO_SMALL 0x00000150UL
#define CKR_CRYPTOKI_NOT_INITIALIZED 0x00000190UL

#endif /* XKS_PKCS11_MIN_H */
